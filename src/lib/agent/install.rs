//! Installing revisions on the agent: `pm-agent update` / `POST /v1/update` pulls the manager's
//! dist (or with `--generation N` / `{"generation": N}` the manager's backup N, which is how
//! pm-rollback moves a fleet back), `pm-agent rollback --to backup:N` / `POST /v1/rollback`
//! reinstalls a local backup.
//!
//! State (below the agent's state directory):
//!
//! ```text
//! files/<sha256>        local copies of every database file installed or kept as a backup
//! installed.json        the installed set (revision, serial, files: name, sha256, size, version)
//!                       and the backups: the three sets installed before, backup:1 first
//! install.lock          taken by every install, so the CLI and the API never install at once
//! ```
//!
//! An update fetches `<dist_url>/manifest.json` and `manifest.sig`, checks the Ed25519
//! signature with the manifest key the manager sent at activation (or the key its rotation chain
//! led to since, see `trust`), and takes the engine's files
//! (engine `clamav`: the `.cvd` files of products of kind `clamav`, and the plain signature files
//! — `.hdb`, `.ndb`, `.ldb`, ... — of `files` feeds). Files whose sha256 is not in `files/` are
//! streamed to disk and checked (size, sha256, ClamAV signature) before anything is installed:
//! only changed files are fetched. Each database file is then copied aside into the database
//! directory (`.<name>.pm-tmp-<pid>`, a name no engine loads)
//! and renamed over `<name>`; a `<db>.cld` that would shadow the new `<db>.cvd` is removed after
//! it (ClamAV loads the newer of the two). A `kill -9` at any instant therefore leaves every
//! database file whole: old or new.
//! `installed.json` is written last (write aside, fsync, rename): the installed set and the
//! backups change together. A crash before it leaves the old record; the next install repairs the
//! database directory from it.
//!
//! Backups rotate like publish: the set being replaced becomes `backup:1`, 1 -> 2 -> 3, the old
//! 3 is dropped. A rollback to `backup:N` installs that set and swaps it with the current one:
//! the set rolled back from becomes `backup:1` (so `rollback --to backup:1` twice is a no-op
//! round trip), N is removed, the others keep their order. Local copies that no set refers to
//! any more are deleted.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::hold::{Held, HoldPolicy};
use super::{Agent, AgentConfig, Engine, error, from_manager, io_error, load_activation};
use crate::cli::{ExitStatus, UserError};
use crate::dist_statement::{
    DistStatement, SIGNATURE_FILE as STATEMENT_SIGNATURE_FILE, STATEMENT_FILE,
};
use crate::durable;
use crate::manifest::{MANIFEST_FILE, Manifest, SIGNATURE_FILE};
use crate::proto::{self, HoldSpec, InstallReport, InstalledFileChange};
use crate::tls::TlsConnectInfo;
use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// Local copies of database files, named by sha256.
pub const FILES_DIR: &str = "files";
/// The installed set.
pub const INSTALLED_FILE: &str = "installed.json";
/// Serialises installs.
const LOCK_FILE: &str = "install.lock";
/// How many sets are kept as backups.
pub const BACKUPS: usize = 3;
/// Largest manifest or signature read from dist.
pub(super) const MAX_DOCUMENT: usize = 16 * 1024 * 1024;
/// How long an install waits for another one to finish.
const LOCK_TIMEOUT: Duration = Duration::from_secs(120);
/// Marker in the names of files written aside in the database directory.
const TMP_MARKER: &str = ".pm-tmp-";

/// One installed database file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetFile {
    /// Name in the database directory.
    pub name: String,
    /// Lowercase hex sha256 (the name of its local copy in `files/`).
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Database version.
    pub version: Option<String>,
    /// Component it carries (from the manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    /// Upstream build time (from the manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_time: Option<chrono::DateTime<chrono::Utc>>,
    /// For a database built here from cdiffs (`daily.cld`): the sha256 of the dist file it
    /// stands for (`daily.cvd` of the same version), so that installing that revision again, or
    /// rolling back to it, reuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dist_sha256: Option<String>,
}

impl SetFile {
    /// Whether `other` carries the same database (a `.cvd` and the `.cld` built from cdiffs
    /// are the same component).
    fn same_database(&self, other: &SetFile) -> bool {
        self.name == other.name || (self.component.is_some() && self.component == other.component)
    }
}

/// An installed set (the current one or a backup in `installed.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledSet {
    /// Revision of the manager's dist it came from.
    pub revision: Option<String>,
    /// Manifest serial of that revision.
    pub serial: Option<u32>,
    /// When it was installed.
    pub installed_at: chrono::DateTime<chrono::Utc>,
    /// Its files, sorted by name.
    pub files: Vec<SetFile>,
}

impl InstalledSet {
    fn same_files(&self, other: &InstalledSet) -> bool {
        self.files == other.files
    }
}

/// Which backup to roll back to: `backup:N`.
pub fn parse_backup(text: &str) -> Result<usize, String> {
    text.strip_prefix("backup:")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| (1..=BACKUPS).contains(n))
        .ok_or_else(|| format!("`{text}` is not a backup: use backup:1, backup:2 or backup:3"))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => {
            Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("`{}` is damaged", path.display())
            })?))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(io_error("read", path)(err)),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    durable::write_atomic(path, &serde_json::to_vec_pretty(value)?, 0o644)
        .map_err(io_error("write", path))
}

/// `installed.json`: the installed set and the backups, in one file so that one rename commits
/// both.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct InstallState {
    installed: Option<InstalledSet>,
    /// `backup:1` first.
    backups: Vec<InstalledSet>,
}

/// The installed set and the backups (`backup:1` first).
fn load_sets(dir: &Path) -> Result<(Option<InstalledSet>, Vec<InstalledSet>)> {
    let state: InstallState = read_json(&dir.join(INSTALLED_FILE))?.unwrap_or_default();
    Ok((state.installed, state.backups))
}

/// The install lock, held while it lives.
pub(super) struct InstallLock {
    _file: File,
}

/// Takes the install lock: one install at a time, and none while a hold is being set.
pub(super) fn lock(dir: &Path) -> Result<InstallLock> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_error("open", &path))?;
    let started = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(InstallLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) if started.elapsed() < LOCK_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(UserError::failure(format!(
                    "another install holds `{}` for more than {LOCK_TIMEOUT:?}",
                    path.display()
                ))
                .into());
            }
            Err(fs::TryLockError::Error(err)) => return Err(io_error("lock", &path)(err)),
        }
    }
}

pub(super) fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = openssl::sha::Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(crate::manifest::hex(&hasher.finish()))
}

/// Whether the local copy of `file` exists and is whole.
fn have_copy(dir: &Path, file: &SetFile) -> bool {
    let path = dir.join(FILES_DIR).join(&file.sha256);
    fs::metadata(&path).is_ok_and(|m| m.len() == file.size)
        && sha256_file(&path).is_ok_and(|sha| sha == file.sha256)
}

/// What the engine takes from a revision: (name in the database directory, manifest path, entry).
fn engine_files(engine: Engine, manifest: &Manifest) -> Result<Vec<(SetFile, String)>> {
    if engine != Engine::Clamav {
        return Err(UserError::failure(format!(
            "engine `{}` has no databases to install from dist",
            engine.as_str()
        ))
        .with_hint("only engine `clamav` installs revisions")
        .into());
    }
    let mut files = Vec::new();
    for product in &manifest.products {
        for entry in manifest.product_files(&product.name) {
            let Some(name) = entry
                .path
                .rsplit('/')
                .next()
                .filter(|name| crate::manifest::engine_loads(&product.kind, name))
            else {
                continue;
            };
            let safe = crate::manifest::engine_file_name_ok(name)
                && !entry.path.split('/').any(|s| s == ".." || s.is_empty());
            let sha_ok = entry.sha256.len() == 64
                && entry
                    .sha256
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            if !safe && product.kind == "files" {
                // A third-party feed's odd file name costs that file, not every update.
                tracing::warn!(file = %entry.path, "skipping a feed file whose name the engine's directory cannot take (use letters, digits, `-`, `_` and `.`)");
                continue;
            }
            if !safe || !sha_ok {
                return Err(UserError::failure(format!(
                    "the signed manifest of {} lists an unusable file `{}`",
                    manifest.revision, entry.path
                ))
                .into());
            }
            if files
                .iter()
                .any(|(f, _): &(SetFile, String)| f.name == name)
            {
                return Err(UserError::failure(format!(
                    "the signed manifest of {} has two database files named `{name}` (the \
                     second is `{}`): one would replace the other in the engine's directory",
                    manifest.revision, entry.path
                ))
                .with_hint(
                    "on the manager, rename one of them in its feed or drop one of the products \
                     from pm.toml, then sync and publish",
                )
                .into());
            }
            files.push((
                SetFile {
                    name: name.to_string(),
                    sha256: entry.sha256.clone(),
                    size: entry.size,
                    version: entry.version.clone(),
                    component: Some(entry.component.clone()),
                    build_time: entry.build_time,
                    dist_sha256: None,
                },
                entry.path.clone(),
            ));
        }
    }
    files.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    if files.is_empty() {
        return Err(UserError::failure(format!(
            "revision {} of the manager's dist has no ClamAV databases",
            manifest.revision
        ))
        .with_hint("add a product of kind `clamav` to pm.toml on the manager, sync and publish")
        .into());
    }
    Ok(files)
}

/// How long a download from dist may go without receiving a byte. Without it a stalled
/// connection held the install (and its lock) for the whole request timeout.
pub const DIST_STALL_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(DIST_STALL_TIMEOUT)
        .timeout(Duration::from_secs(600))
        .build()
        .context("cannot make an HTTP client")
}

pub(super) async fn get(client: &reqwest::Client, url: &str, limit: u64) -> Result<Vec<u8>> {
    get_unless_missing(client, url, limit, false)
        .await
        .map(|body| body.unwrap_or_default())
}

/// [`get`], or with `missing_ok` `None` for a 404.
pub(super) async fn get_unless_missing(
    client: &reqwest::Client,
    url: &str,
    limit: u64,
    missing_ok: bool,
) -> Result<Option<Vec<u8>>> {
    let unreachable = |err: reqwest::Error| {
        UserError::failure(format!("cannot fetch `{url}`: {err}"))
            .with_hint("check that `pm-mirror serve` runs on the manager and the dist URL given at activation is reachable from this host")
    };
    let response = client.get(url).send().await.map_err(unreachable)?;
    if missing_ok && response.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !response.status().is_success() {
        let hint = if url.contains("/backup/") {
            "the manager has no such backup generation: `pm-mirror status` on the manager lists them"
        } else {
            "check that the manager published a revision (`pm-mirror publish`)"
        };
        return Err(
            UserError::failure(format!("`{url}` answered {}", response.status()))
                .with_hint(hint)
                .into(),
        );
    }
    if response.content_length().is_some_and(|len| len > limit) {
        return Err(UserError::failure(format!("`{url}` is larger than expected")).into());
    }
    // Streamed against the limit: a server that sends without end costs no more than it.
    let mut response = response;
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(UserError::failure(format!("`{url}` is larger than expected")).into());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// `base/path`, the manifest path percent-encoded ([`crate::manifest::url_path`]).
pub(super) fn join_url(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        crate::manifest::url_path(path)
    )
}

/// Fetches and verifies the signed manifest at `dist_url` (dist, or a backup generation).
pub(super) async fn fetch_manifest(
    client: &reqwest::Client,
    dir: &Path,
    dist_url: &str,
) -> Result<Manifest> {
    let manifest_url = join_url(dist_url, MANIFEST_FILE);
    let body = get(client, &manifest_url, MAX_DOCUMENT as u64).await?;
    let signature = get(client, &join_url(dist_url, SIGNATURE_FILE), 4096).await?;
    super::trust::verify_signed(client, dir, &manifest_url, &body, &signature).await?;
    let manifest: Manifest = serde_json::from_slice(&body).map_err(|err| {
        UserError::failure(format!(
            "the signed manifest `{manifest_url}` is not valid: {err}"
        ))
    })?;
    manifest.check_shape().map_err(|problem| {
        UserError::failure(format!("refusing `{manifest_url}`: {problem}"))
            .with_hint("the manager is newer than this agent, or its repository is damaged: check `pm-mirror status` there")
    })?;
    Ok(manifest)
}

/// The last dist statement this agent accepted; under `manager/`, so that a reset (before an
/// activation with another manager) forgets it with the rest of the manager's trust.
pub const ACCEPTED_STATEMENT_FILE: &str = "manager/dist-statement.json";

/// Fetches the manager's dist: its signed statement (refused when older than one accepted
/// before, expired, or naming another manifest), then the manifest it names. A manager that
/// never wrote a statement is followed as before, until the agent has accepted one. Returns the
/// statement to record with [`accept_statement`] once the install succeeded, if it is new.
pub(super) async fn fetch_dist(
    client: &reqwest::Client,
    dir: &Path,
    dist_url: &str,
) -> Result<(Manifest, Option<DistStatement>)> {
    let accepted_path = dir.join(ACCEPTED_STATEMENT_FILE);
    let accepted: Option<DistStatement> = read_json(&accepted_path)?;
    // Publish may switch dist between the two fetches: one more try sees a consistent pair.
    for attempt in 0..2 {
        let statement = fetch_statement(client, dir, dist_url).await?;
        let manifest = fetch_manifest(client, dir, dist_url).await?;
        let Some(statement) = statement else {
            if let Some(accepted) = &accepted {
                return Err(UserError::failure(format!(
                    "refusing dist at `{dist_url}`: it serves no signed dist statement, but this \
                     agent accepted one (dist serial {}, {}) before",
                    accepted.dist_serial, accepted.revision
                ))
                .with_hint(
                    "something between this host and the manager strips `dist.json`, or the \
                     manager's repository was replaced by an older one; check `pm-mirror serve` \
                     and run `pm-mirror publish` on the manager",
                )
                .into());
            }
            return Ok((manifest, None));
        };
        if !statement.names(&manifest) {
            if attempt == 0 {
                continue;
            }
            return Err(UserError::failure(format!(
                "refusing dist at `{dist_url}`: its signed statement names {} (serial {}) but \
                 the manifest served is {} (serial {})",
                statement.revision, statement.manifest_serial, manifest.revision, manifest.serial
            ))
            .with_hint(
                "files of two different dists are being served together: check the dist URL \
                 and any cache or proxy in front of `pm-mirror serve`",
            )
            .into());
        }
        if let Some(accepted) = accepted
            .as_ref()
            .filter(|a| a.dist_serial > statement.dist_serial)
        {
            return Err(UserError::failure(format!(
                "refusing dist at `{dist_url}`: its signed statement (dist serial {}, {}, \
                 signed {}) is older than one this agent already accepted (dist serial {}, {}, \
                 signed {}): an old dist is being replayed",
                statement.dist_serial,
                statement.revision,
                statement.signed_at.format("%Y-%m-%d %H:%M:%SZ"),
                accepted.dist_serial,
                accepted.revision,
                accepted.signed_at.format("%Y-%m-%d %H:%M:%SZ"),
            ))
            .with_hint(format!(
                "check what serves the dist URL; to roll this host back on purpose use \
                 `pm-rollback` (or `pm-agent update --generation N`); if the manager's \
                 repository was rebuilt, remove `{}`",
                accepted_path.display()
            ))
            .into());
        }
        let now = chrono::Utc::now();
        if statement.is_expired(now) {
            return Err(UserError::failure(format!(
                "refusing dist at `{dist_url}`: its signed statement expired at {} (signed {}): \
                 dist has not been re-signed for longer than the manager allows, so it may be \
                 a frozen copy",
                statement.expires_at.format("%Y-%m-%d %H:%M:%SZ"),
                statement.signed_at.format("%Y-%m-%d %H:%M:%SZ"),
            ))
            .with_hint(
                "on the manager, check that the `pm-mirror-sync` timer runs `pm-mirror publish` \
                 (it re-signs dist) and run it; check this host's clock",
            )
            .into());
        }
        let new = (accepted.as_ref() != Some(&statement)).then_some(statement);
        return Ok((manifest, new));
    }
    unreachable!("the second attempt returns")
}

/// Records `statement` as the newest this agent accepted: later dists must not be older.
pub(super) fn accept_statement(dir: &Path, statement: &DistStatement) -> Result<()> {
    write_json(&dir.join(ACCEPTED_STATEMENT_FILE), statement)
}

/// The signed dist statement at `dist_url`, verified; `None` when the manager serves none.
async fn fetch_statement(
    client: &reqwest::Client,
    dir: &Path,
    dist_url: &str,
) -> Result<Option<DistStatement>> {
    let url = join_url(dist_url, STATEMENT_FILE);
    let limit = crate::dist_statement::MAX_STATEMENT_BYTES;
    let Some(body) = get_unless_missing(client, &url, limit, true).await? else {
        return Ok(None);
    };
    let signature = get(client, &join_url(dist_url, STATEMENT_SIGNATURE_FILE), 4096).await?;
    super::trust::verify_signed(client, dir, &url, &body, &signature).await?;
    serde_json::from_slice(&body).map(Some).map_err(|err| {
        UserError::failure(format!(
            "the signed dist statement `{url}` is not valid: {err}"
        ))
        .with_hint("the manager is newer than this agent: upgrade pm-agent")
        .into()
    })
}

/// Streams `url` into `path` (created 0644, fsynced), refusing more than `limit` bytes.
/// Returns the bytes written and their sha256; memory use does not grow with the file.
async fn fetch_to_file(
    client: &reqwest::Client,
    url: &str,
    limit: u64,
    path: &Path,
) -> Result<(u64, String)> {
    let unreachable = |err: reqwest::Error| {
        UserError::failure(format!("cannot fetch `{url}`: {err}")).with_hint(
            "check that `pm-mirror serve` runs on the manager and the dist URL given at \
             activation is reachable from this host",
        )
    };
    let mut response = client.get(url).send().await.map_err(unreachable)?;
    if !response.status().is_success() {
        return Err(
            UserError::failure(format!("`{url}` answered {}", response.status()))
                .with_hint("check that the manager's dist is whole (`pm-mirror status`)")
                .into(),
        );
    }
    let too_large =
        || UserError::failure(format!("`{url}` is larger than the signed manifest says"));
    if response.content_length().is_some_and(|len| len > limit) {
        return Err(too_large().into());
    }
    let mut output = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)
        .map_err(io_error("create", path))?;
    let mut hasher = openssl::sha::Sha256::new();
    let mut written = 0u64;
    while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
        written += chunk.len() as u64;
        if written > limit {
            return Err(too_large().into());
        }
        hasher.update(&chunk);
        output.write_all(&chunk).map_err(io_error("write", path))?;
    }
    output.sync_all().map_err(io_error("write", path))?;
    Ok((written, crate::manifest::hex(&hasher.finish())))
}

/// Streams `url` to `path` and checks it against the signed manifest's `size` and `sha256`;
/// removes `path` when it does not match. Returns the bytes fetched.
async fn fetch_checked(
    client: &reqwest::Client,
    url: &str,
    size: u64,
    sha256: &str,
    path: &Path,
) -> Result<u64> {
    let result = async {
        let (fetched, sha) = fetch_to_file(client, url, size, path).await?;
        if fetched != size {
            return Err(refusing(
                url,
                format!("{fetched} bytes, the signed manifest says {size}"),
            ));
        }
        if sha != sha256 {
            return Err(refusing(
                url,
                format!("sha256 {sha}, the signed manifest says {sha256}"),
            ));
        }
        anyhow::Ok(fetched)
    }
    .await;
    if result.is_err() {
        let _ = fs::remove_file(path);
    }
    result
}

fn refusing(url: &str, problem: String) -> anyhow::Error {
    UserError::failure(format!("refusing `{url}`: {problem}"))
        .with_hint("nothing was installed; run the update again, and check the manager's dist (`pm-mirror status`) if it persists")
        .into()
}

/// Downloads `file` from `url` into the local copies, unless a whole copy is there: streamed
/// aside, checked (size, sha256, ClamAV signature), then renamed. Returns the bytes fetched, or
/// `None` when the local copy was already there.
async fn download(
    client: &reqwest::Client,
    dir: &Path,
    url: &str,
    file: &SetFile,
) -> Result<Option<u64>> {
    if have_copy(dir, file) {
        return Ok(None);
    }
    let files = dir.join(FILES_DIR);
    durable::create_private_dir(&files, 0o700).map_err(io_error("create directory", &files))?;
    let path = files.join(&file.sha256);
    let aside = files.join(format!(
        ".{}{TMP_MARKER}{}",
        file.sha256,
        std::process::id()
    ));
    let size = fetch_checked(client, url, file.size, &file.sha256, &aside).await?;
    let result = (|| {
        if file.name.ends_with(".cvd") {
            crate::clamav::verify_cvd_file(&aside).map_err(|err| refusing(url, err.to_string()))?;
        }
        fs::rename(&aside, &path).map_err(io_error("write", &path))?;
        durable::sync_dir(&files).map_err(io_error("sync", &files))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&aside);
    }
    result.map(|()| Some(size))
}

/// Where cdiffs are applied, below the state directory (one install at a time holds the lock).
const PATCH_DIR: &str = "patch.tmp";

/// Builds `file`, a `.cvd` of version M this agent lacks, as `<db>.cld` from the installed
/// version N and the cdiffs N+1..=M that dist carries beside it, as freshclam does: a daily
/// change costs a cdiff instead of the whole database. The result is verified with ClamAV's own
/// keys (every cdiff's signature, the signed `.info` of the result and every member against it)
/// and must be version M. `Ok(None)`: there is no such chain (or it is not smaller than the
/// database), so the caller downloads the `.cvd`.
async fn build_from_cdiffs(
    client: &reqwest::Client,
    dir: &Path,
    source_url: &str,
    manifest: &Manifest,
    installed: Option<&InstalledSet>,
    (file, path): (&SetFile, &str),
) -> Result<Option<(SetFile, Downloaded)>> {
    let version = |f: &SetFile| f.version.as_deref().and_then(|v| v.parse::<u32>().ok());
    let (Some(stem), Some(target)) = (file.name.strip_suffix(".cvd"), version(file)) else {
        return Ok(None);
    };
    let Some(current) = installed.and_then(|set| set.files.iter().find(|f| f.same_database(file)))
    else {
        return Ok(None);
    };
    let Some(from) = version(current).filter(|&from| from < target) else {
        return Ok(None);
    };
    let product_dir = path.rsplit_once('/').map_or("", |(dir, _)| dir);
    let chain: Option<Vec<_>> = (from + 1..=target)
        .map(|v| {
            manifest.file(&format!(
                "{product_dir}/{}",
                crate::clamav::cdiff_file_name(stem, v)
            ))
        })
        .collect();
    let Some(chain) = chain else {
        return Ok(None);
    };
    if chain.iter().map(|entry| entry.size).sum::<u64>() >= file.size || !have_copy(dir, current) {
        return Ok(None);
    }
    let work = dir.join(PATCH_DIR);
    let _ = fs::remove_dir_all(&work);
    durable::create_private_dir(&work, 0o700).map_err(io_error("create directory", &work))?;
    let result = async {
        let mut downloaded = Downloaded::default();
        let mut cdiffs = Vec::new();
        for entry in &chain {
            let name = entry.path.rsplit('/').next().unwrap_or(&entry.path);
            let local = work.join(name);
            let url = join_url(source_url, &entry.path);
            downloaded.bytes +=
                fetch_checked(client, &url, entry.size, &entry.sha256, &local).await?;
            downloaded.files.push(name.to_string());
            cdiffs.push(local);
        }
        let built = work.join(format!("{stem}.cld"));
        let database = dir.join(FILES_DIR).join(&current.sha256);
        let header =
            crate::clamav::cdiff::apply_cdiffs(&database, &cdiffs, &work.join("unpacked"), &built)?;
        if header.version != target {
            return Err(anyhow::anyhow!(
                "the cdiffs built version {}, the signed manifest says {target}",
                header.version
            ));
        }
        let sha256 = sha256_file(&built).map_err(io_error("read", &built))?;
        let size = fs::metadata(&built)
            .map_err(io_error("read", &built))?
            .len();
        let copy = dir.join(FILES_DIR).join(&sha256);
        fs::rename(&built, &copy).map_err(io_error("write", &copy))?;
        durable::sync_parent_dir(&copy).map_err(io_error("sync", &copy))?;
        let set_file = SetFile {
            name: format!("{stem}.cld"),
            sha256,
            size,
            dist_sha256: Some(file.sha256.clone()),
            ..file.clone()
        };
        anyhow::Ok((set_file, downloaded))
    }
    .await;
    let _ = fs::remove_dir_all(&work);
    result.map(Some)
}

/// The local copy that stands for `file`: itself, or a `.cld` built earlier from cdiffs for
/// exactly that dist file, in the installed set or a backup.
fn local_equivalent(dir: &Path, sets: &[&InstalledSet], file: &SetFile) -> Option<SetFile> {
    if have_copy(dir, file) {
        return Some(file.clone());
    }
    sets.iter()
        .flat_map(|set| &set.files)
        .find(|f| f.dist_sha256.as_deref() == Some(file.sha256.as_str()) && have_copy(dir, f))
        .cloned()
}

/// Removes files written aside by an install that was killed.
fn remove_leftovers(db: &Path) -> Result<()> {
    let entries = match fs::read_dir(db) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(io_error("read", db)(err)),
    };
    for entry in entries {
        let entry = entry.map_err(io_error("read", db))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.contains(TMP_MARKER) {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Replaces `db/<name>` with the local copy of `file`: copy aside, fsync, rename. A copy, not a
/// hard link: whoever writes into the database directory in place (`cp` onto a database file
/// does) must not damage the backups.
fn install_file(dir: &Path, db: &Path, file: &SetFile) -> Result<()> {
    let source = dir.join(FILES_DIR).join(&file.sha256);
    let target = db.join(&file.name);
    let aside = db.join(format!(".{}{TMP_MARKER}{}", file.name, std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut input = File::open(&source)?;
        // Whoever can write the database directory must not make the agent (root) write
        // elsewhere through a link planted at the aside name: remove what is there (a link
        // itself, never its target) and create a new file, which never follows a link.
        match fs::remove_file(&aside) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        let mut output = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&aside)?;
        std::io::copy(&mut input, &mut output)?;
        output.flush()?;
        output.sync_all()?;
        fs::rename(&aside, &target)?;
        durable::sync_dir(db)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&aside);
    }
    result.map_err(io_error("install", &target))
}

fn remove_if_present(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(io_error("remove", path)(err)),
    }
}

/// Installs `set` into the database directory and removes what `previous` installed that `set`
/// does not have. Returns whether a file changed.
fn install_set(
    dir: &Path,
    db: &Path,
    set: &InstalledSet,
    previous: Option<&InstalledSet>,
) -> Result<bool> {
    fs::create_dir_all(db).map_err(io_error("create directory", db))?;
    remove_leftovers(db)?;
    let mut changed = false;
    for file in &set.files {
        let target = db.join(&file.name);
        let current = fs::metadata(&target)
            .ok()
            .filter(|m| m.len() == file.size)
            .and_then(|_| sha256_file(&target).ok());
        if current.as_deref() != Some(file.sha256.as_str()) {
            install_file(dir, db, file)?;
            changed = true;
        }
        // ClamAV loads the newer of <db>.cld and <db>.cvd: the one installed must be the only
        // one (removed after the new one is in place, so the engine always finds one).
        let other = match file.name.rsplit_once('.') {
            Some((stem, "cvd")) => Some(format!("{stem}.cld")),
            Some((stem, "cld")) => Some(format!("{stem}.cvd")),
            _ => None,
        };
        if let Some(other) = other {
            changed |= remove_if_present(&db.join(other))?;
        }
    }
    for old in previous.map(|p| p.files.as_slice()).unwrap_or_default() {
        if !set.files.iter().any(|f| f.name == old.name) {
            changed |= remove_if_present(&db.join(&old.name))?;
        }
    }
    durable::sync_dir(db).map_err(io_error("sync", db))?;
    Ok(changed)
}

/// Deletes local copies no set refers to.
fn collect_garbage(dir: &Path, keep: &[&InstalledSet]) -> Result<()> {
    let files = dir.join(FILES_DIR);
    let Ok(entries) = fs::read_dir(&files) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry.map_err(io_error("read", &files))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let used = keep
            .iter()
            .any(|set| set.files.iter().any(|f| f.sha256 == name));
        if !used {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

fn changes(previous: Option<&InstalledSet>, set: &InstalledSet) -> Vec<InstalledFileChange> {
    let before = previous.map(|p| p.files.as_slice()).unwrap_or_default();
    let mut out = Vec::new();
    for file in &set.files {
        let old = before.iter().find(|f| f.same_database(file));
        if old.map(|o| &o.sha256) != Some(&file.sha256) {
            out.push(InstalledFileChange {
                name: file.name.clone(),
                from_version: old.and_then(|o| o.version.clone()),
                to_version: file.version.clone(),
            });
        }
    }
    for old in before {
        if !set.files.iter().any(|f| f.same_database(old)) {
            out.push(InstalledFileChange {
                name: old.name.clone(),
                from_version: old.version.clone(),
                to_version: None,
            });
        }
    }
    out
}

/// Sends clamd one command (`zPING`, `zRELOAD`, ...) on its local socket and returns its answer,
/// every step bounded by `timeout`.
pub(super) fn clamd_command(
    socket: &Path,
    command: &str,
    timeout: Duration,
) -> std::io::Result<String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("z{command}\0").as_bytes())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    Ok(String::from_utf8_lossy(&answer)
        .trim_end_matches(['\0', '\n'])
        .to_string())
}

/// A one-connection stand-in for clamd on `socket`: reads a command of `command_len` bytes,
/// answers `answer`, and gives the command it read.
#[cfg(test)]
pub(super) fn fake_clamd(
    socket: &Path,
    command_len: usize,
    answer: &'static [u8],
) -> std::thread::JoinHandle<Vec<u8>> {
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut command = vec![0u8; command_len];
        stream.read_exact(&mut command).unwrap();
        stream.write_all(answer).unwrap();
        command
    })
}

/// Tells clamd to reload its databases (`zRELOAD`), when the configuration names its socket.
fn reload_engine(config: &AgentConfig) -> Result<bool> {
    let Some(socket) = &config.clamd_socket else {
        return Ok(false);
    };
    match clamd_command(socket, "RELOAD", Duration::from_secs(30)) {
        Ok(answer) if answer.contains("RELOADING") => Ok(true),
        Ok(answer) => Err(UserError::failure(format!(
            "the databases are installed, but clamd at `{}` answered `{answer}` to RELOAD",
            socket.display()
        ))
        .into()),
        Err(err) => Err(UserError::failure(format!(
            "the databases are installed, but clamd at `{}` cannot be told to reload: {err}",
            socket.display()
        ))
        .with_hint("start clamd, or remove `clamd_socket` from agent.toml when clamd does not run")
        .into()),
    }
}

/// Commits `set` as the installed one: backups rotate (the replaced set becomes backup:1 unless
/// it already is), then `installed.json`.
fn commit(
    dir: &Path,
    set: &InstalledSet,
    previous: Option<&InstalledSet>,
    mut backups: Vec<InstalledSet>,
) -> Result<Vec<InstalledSet>> {
    if let Some(previous) = previous
        && !previous.same_files(set)
        && backups.first().is_none_or(|b| !b.same_files(previous))
    {
        backups.insert(0, previous.clone());
    }
    backups.truncate(BACKUPS);
    let state = InstallState {
        installed: Some(set.clone()),
        backups,
    };
    write_json(&dir.join(INSTALLED_FILE), &state)?;
    Ok(state.backups)
}

pub(super) fn activated_dist_url(dir: &Path) -> Result<String> {
    match load_activation(dir)? {
        Some(activation) => Ok(activation.record.dist_url),
        None => Err(UserError::failure(
            "this agent is not activated: it has no dist to install from",
        )
        .with_hint("activate it with `pm-activate host` on the manager first")
        .into()),
    }
}

/// `update [--generation N]`: installs the manager's dist, or with `Some(N)` the manager's
/// backup N, served at `<dist_url>/backup/N/` and verified with the manager key exactly like
/// dist. Installing an older revision this way is the operator's explicit rollback: the report
/// says `rollback` whenever the installed serial goes down. `policy` says what a hold on the
/// host does to it (see `hold`); [`hold::Held`](super::hold::Held) when it forbids it.
pub fn update_from(
    dir: &Path,
    config: &AgentConfig,
    generation: Option<usize>,
    policy: &HoldPolicy,
) -> Result<InstallReport> {
    if let Some(n) = generation {
        crate::repo::check_generation(n).map_err(UserError::usage)?;
    }
    let dist_url = activated_dist_url(dir)?;
    let source_url = match generation {
        None => dist_url,
        Some(n) => join_url(&dist_url, &format!("backup/{n}")),
    };
    let _lock = lock(dir)?;
    super::hold::admit(dir, policy)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (installed, backups) = load_sets(dir)?;
    let (manifest, statement, files, downloaded) = runtime.block_on(async {
        let client = http_client()?;
        let (manifest, statement) = match generation {
            // The operator's explicit rollback to a backup: older on purpose.
            Some(_) => (fetch_manifest(&client, dir, &source_url).await?, None),
            None => fetch_dist(&client, dir, &source_url).await?,
        };
        let wanted = engine_files(config.engine, &manifest)?;
        let sets: Vec<&InstalledSet> = installed.iter().chain(&backups).collect();
        let mut downloaded = Downloaded::default();
        let mut files = Vec::new();
        for (file, path) in &wanted {
            if let Some(local) = local_equivalent(dir, &sets, file) {
                files.push(local);
                continue;
            }
            let built = build_from_cdiffs(
                &client,
                dir,
                &source_url,
                &manifest,
                installed.as_ref(),
                (file, path),
            );
            match built.await {
                Ok(Some((built, fetched))) => {
                    downloaded.files.extend(fetched.files);
                    downloaded.bytes += fetched.bytes;
                    files.push(built);
                    continue;
                }
                Ok(None) => {}
                Err(err) => tracing::warn!(
                    file = %file.name,
                    error = %format!("{err:#}"),
                    "cannot build the database from cdiffs; downloading it whole"
                ),
            }
            if let Some(bytes) = download(&client, dir, &join_url(&source_url, path), file).await? {
                downloaded.files.push(file.name.clone());
                downloaded.bytes += bytes;
            }
            files.push(file.clone());
        }
        anyhow::Ok((manifest, statement, files, downloaded))
    })?;
    let set = InstalledSet {
        revision: Some(manifest.revision.clone()),
        serial: Some(manifest.serial),
        installed_at: chrono::Utc::now(),
        files,
    };
    let older = matches!(
        (set.serial, installed.as_ref().and_then(|i| i.serial)),
        (Some(new), Some(old)) if new < old
    );
    let action = if older { "rollback" } else { "update" };
    let report = finish(dir, config, action, set, installed, backups, downloaded)?;
    if let Some(statement) = statement {
        accept_statement(dir, &statement)?;
    }
    super::hold::after_install(dir, policy)?;
    Ok(report)
}

/// The generation a `POST /v1/update` body asks for (`None`, dist, for an empty body, `null`
/// or `{}`), and the hold to take with it.
fn parse_update_request(body: &[u8]) -> Result<(Option<usize>, Option<HoldSpec>), String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((None, None));
    }
    let invalid = |problem: String| {
        format!(
            "the update request is not valid ({problem}): send no body or {{}} for dist, or \
             {{\"generation\": N}} with N 1, 2 or 3 for the manager's backup N"
        )
    };
    // An object or null only: serde would also take `[1]` for the struct.
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|err| invalid(err.to_string()))?;
    if !value.is_object() && !value.is_null() {
        return Err(invalid("not a JSON object".into()));
    }
    let request: proto::UpdateRequest = serde_json::from_value::<Option<_>>(value)
        .map_err(|err| invalid(err.to_string()))?
        .unwrap_or_default();
    if let Some(hold) = &request.hold {
        super::hold::check_spec(hold)?;
    }
    let generation = request
        .generation
        .map(|n| crate::repo::check_generation(n as usize))
        .transpose()?;
    Ok((generation, request.hold))
}

/// What an install fetched from the manager.
#[derive(Debug, Default)]
struct Downloaded {
    /// Names of the files fetched.
    files: Vec<String>,
    /// Bytes fetched.
    bytes: u64,
}

fn finish(
    dir: &Path,
    config: &AgentConfig,
    action: &str,
    mut set: InstalledSet,
    installed: Option<InstalledSet>,
    backups: Vec<InstalledSet>,
    downloaded: Downloaded,
) -> Result<InstallReport> {
    let changed = install_set(dir, &config.database_dir, &set, installed.as_ref())?;
    let unchanged_record = installed.as_ref().is_some_and(|i| {
        i.same_files(&set) && i.revision == set.revision && i.serial == set.serial
    });
    let backups = if unchanged_record {
        set = installed.clone().unwrap_or(set);
        backups
    } else {
        commit(dir, &set, installed.as_ref(), backups)?
    };
    let mut keep: Vec<&InstalledSet> = backups.iter().collect();
    keep.push(&set);
    collect_garbage(dir, &keep)?;
    let files = if changed {
        changes(installed.as_ref(), &set)
    } else {
        Vec::new()
    };
    let reloaded = if changed {
        reload_engine(config)?
    } else {
        false
    };
    tracing::info!(
        action,
        changed,
        revision = set.revision.as_deref().unwrap_or("-"),
        "install done"
    );
    Ok(InstallReport {
        changed,
        action: action.to_string(),
        revision: set.revision.clone(),
        serial: set.serial,
        previous_revision: installed.and_then(|i| i.revision),
        files,
        downloaded: downloaded.files,
        downloaded_bytes: downloaded.bytes,
        reloaded,
    })
}

/// `rollback --to backup:N`: reinstalls backup N from the local copies, and holds the host
/// there with `hold` (a rollback by hand stays: see `hold`).
pub fn rollback(
    dir: &Path,
    config: &AgentConfig,
    n: usize,
    hold: HoldSpec,
) -> Result<InstallReport> {
    let policy = HoldPolicy::Take(hold);
    let _lock = lock(dir)?;
    let (installed, mut backups) = load_sets(dir)?;
    if n == 0 || n > backups.len() {
        return Err(UserError::failure(format!(
            "there is no backup:{n}: this agent keeps {} backup(s)",
            backups.len()
        ))
        .with_hint("`pm-agent status` lists them; every update that changes the databases adds one")
        .into());
    }
    let mut target = backups.remove(n - 1);
    for file in &target.files {
        if !have_copy(dir, file) {
            return Err(UserError::failure(format!(
                "the local copy of `{}` (sha256 {}) of backup:{n} is missing or damaged",
                file.name, file.sha256
            ))
            .with_hint("nothing was changed; roll back from the manager (pm-rollback) instead")
            .into());
        }
    }
    super::hold::admit(dir, &policy)?;
    target.installed_at = chrono::Utc::now();
    // The set rolled back from becomes backup:1 (commit puts it first).
    let report = finish(
        dir,
        config,
        "rollback",
        target,
        installed,
        backups,
        Downloaded::default(),
    )?;
    super::hold::after_install(dir, &policy)?;
    Ok(report)
}

/// The files of `set` that the database directory `db` no longer holds as installed, checked
/// cheaply (one `stat` each: there, a regular file, the installed size), with what is wrong,
/// for people. A file changed in place at the same size is only found by the next install,
/// which checks every file's sha256.
pub(super) fn damaged_files(db: &Path, set: &InstalledSet) -> Vec<(String, String)> {
    set.files
        .iter()
        .filter_map(|file| {
            let path = db.join(&file.name);
            let problem = match fs::symlink_metadata(&path) {
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    format!("`{}` is missing from `{}`", file.name, db.display())
                }
                Err(err) => format!("`{}` cannot be read: {err}", path.display()),
                Ok(meta) if !meta.is_file() => {
                    format!("`{}` is not a regular file", path.display())
                }
                Ok(meta) if meta.len() != file.size => format!(
                    "`{}` is {} bytes, installed as {}",
                    path.display(),
                    meta.len(),
                    file.size
                ),
                Ok(_) => return None,
            };
            Some((file.name.clone(), problem))
        })
        .collect()
}

/// The installed revision and the revisions of the backups (`backup:1` first), for `status`.
/// What is installed, for the manager's poll: what the database directory `db` really holds.
/// A file of the installed set that is gone or changed (see [`damaged_files`]) has no version,
/// and the set no revision: the manager shows the host behind dist and installs it again.
pub(super) fn installed_state(dir: &Path, db: &Path) -> Result<Option<proto::InstalledState>> {
    let (installed, backups) = load_sets(dir)?;
    Ok(installed.map(|set| {
        let damaged = damaged_files(db, &set);
        let is_damaged = |file: &SetFile| damaged.iter().any(|(name, _)| *name == file.name);
        proto::InstalledState {
            revision: set.revision.clone().filter(|_| damaged.is_empty()),
            serial: set.serial,
            installed_at: set.installed_at,
            components: set
                .files
                .iter()
                .map(|file| proto::InstalledComponent {
                    component: file.component.clone().unwrap_or_else(|| {
                        // Sets installed before components were recorded: `daily.cvd` -> `daily`.
                        file.name
                            .rsplit_once('.')
                            .map_or(file.name.clone(), |(stem, _)| stem.to_string())
                    }),
                    version: file.version.clone().filter(|_| !is_damaged(file)),
                    build_time: file.build_time.filter(|_| !is_damaged(file)),
                })
                .collect(),
            backups: backups.into_iter().map(|set| set.revision).collect(),
            damaged: damaged.into_iter().map(|(_, problem)| problem).collect(),
        }
    }))
}

/// What is wrong with the database directory against the installed set, for `status`.
pub(super) fn database_problems(dir: &Path, db: &Path) -> Result<Vec<String>> {
    let (installed, _) = load_sets(dir)?;
    Ok(installed
        .map(|set| damaged_files(db, &set))
        .unwrap_or_default()
        .into_iter()
        .map(|(_, problem)| problem)
        .collect())
}

pub(super) fn revisions(dir: &Path) -> Result<(Option<String>, Vec<Option<String>>)> {
    let (installed, backups) = load_sets(dir)?;
    Ok((
        installed.and_then(|set| set.revision),
        backups.into_iter().map(|set| set.revision).collect(),
    ))
}

/// Prints a report like the other commands.
pub fn print(report: &InstallReport, json: bool) -> Result<ExitStatus> {
    if json {
        crate::cli::print_json(report)?;
        return Ok(ExitStatus::Success);
    }
    let revision = report.revision.as_deref().unwrap_or("-");
    let mut text = if report.changed {
        format!(
            "{}: installed {revision} (was {})",
            report.action,
            report.previous_revision.as_deref().unwrap_or("nothing")
        )
    } else {
        format!(
            "{}: {revision} is installed already; nothing changed",
            report.action
        )
    };
    for file in &report.files {
        text.push_str(&format!(
            "\n  {}: {} -> {}",
            file.name,
            file.from_version.as_deref().unwrap_or("-"),
            file.to_version.as_deref().unwrap_or("removed")
        ));
    }
    if report.reloaded {
        text.push_str("\nclamd reloaded");
    }
    crate::cli::print_text(text)?;
    Ok(ExitStatus::Success)
}

/// Runs an install on a blocking thread (it does file I/O and its own HTTP runtime) and answers
/// with its report.
async fn run_blocking(
    agent: Arc<Agent>,
    work: impl FnOnce(&Path, &AgentConfig) -> Result<InstallReport> + Send + 'static,
) -> Response {
    let joined = tokio::task::spawn_blocking(move || {
        super::schedule::record_run(&agent.dir, "manager", || work(&agent.dir, &agent.config))
    })
    .await;
    match joined {
        Ok(Ok(report)) => axum::Json(report).into_response(),
        Ok(Err(err)) if super::stop::stopping() && err.downcast_ref::<Held>().is_none() => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            format!("{err:#}"),
        ),
        Ok(Err(err)) => match err.downcast_ref::<Held>() {
            Some(Held(hold)) => {
                tracing::info!(reason = %hold.reason, "install refused: the host is held");
                let body = proto::HeldResponse {
                    code: "held".into(),
                    message: err.to_string(),
                    hold: hold.clone(),
                };
                (StatusCode::CONFLICT, axum::Json(body)).into_response()
            }
            None => {
                tracing::error!(error = %format!("{err:#}"), "install failed");
                super::failure_response("install_failed", &err)
            }
        },
        Err(err) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the install stopped: {err}"),
        ),
    }
}

/// `POST /v1/update`, optionally with [`proto::UpdateRequest`].
pub(super) async fn update_handler(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
    body: Bytes,
) -> Response {
    if let Err(response) = from_manager(&agent.lock(), &info) {
        return *response;
    }
    let (generation, hold) = match parse_update_request(&body) {
        Ok(request) => request,
        Err(problem) => return error(StatusCode::BAD_REQUEST, "bad_request", problem),
    };
    // With a hold the manager rolls the host back on purpose; without one it installs what
    // it thinks the host follows, which a hold it did not know of refuses.
    let policy = hold.map_or(HoldPolicy::Refuse, HoldPolicy::Take);
    run_blocking(agent, move |dir, config| {
        update_from(dir, config, generation, &policy)
    })
    .await
}

/// `POST /v1/rollback` with [`proto::RollbackRequest`].
pub(super) async fn rollback_handler(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
    body: Bytes,
) -> Response {
    if let Err(response) = from_manager(&agent.lock(), &info) {
        return *response;
    }
    let request: proto::RollbackRequest = match super::parse_body(&body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let n = match parse_backup(&request.to) {
        Ok(n) => n,
        Err(problem) => return error(StatusCode::BAD_REQUEST, "bad_request", problem),
    };
    if let Some(Err(problem)) = request.hold.as_ref().map(super::hold::check_spec) {
        return error(StatusCode::BAD_REQUEST, "bad_request", problem);
    }
    let hold = request
        .hold
        .unwrap_or_else(|| super::hold::rolled_back_by_hand(&request.to, "the manager"));
    run_blocking(agent, move |dir, config| rollback(dir, config, n, hold)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn sha256_hex(bytes: &[u8]) -> String {
        crate::manifest::hex(&openssl::sha::sha256(bytes))
    }

    #[test]
    fn a_link_planted_at_the_aside_name_is_not_followed() {
        let state = tempfile::tempdir().unwrap();
        let db = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"keep me").unwrap();
        let content = b"database";
        let file = SetFile {
            name: "test.cvd".into(),
            sha256: sha256_hex(content),
            size: content.len() as u64,
            version: None,
            component: None,
            build_time: None,
            dist_sha256: None,
        };
        fs::create_dir_all(state.path().join(FILES_DIR)).unwrap();
        fs::write(state.path().join(FILES_DIR).join(&file.sha256), content).unwrap();
        let aside = db
            .path()
            .join(format!(".test.cvd{TMP_MARKER}{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &aside).unwrap();
        install_file(state.path(), db.path(), &file).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep me");
        assert_eq!(fs::read(db.path().join("test.cvd")).unwrap(), content);
        assert!(
            !fs::symlink_metadata(db.path().join("test.cvd"))
                .unwrap()
                .is_symlink()
        );
        assert!(fs::symlink_metadata(&aside).is_err());
    }

    #[test]
    fn backups_are_named_backup_1_to_3() {
        assert_eq!(parse_backup("backup:1"), Ok(1));
        assert_eq!(parse_backup("backup:3"), Ok(3));
        for bad in ["backup:0", "backup:4", "1", "backup:", "r3"] {
            assert!(parse_backup(bad).is_err(), "{bad}");
        }
    }

    fn set(revision: &str, sha: &str) -> InstalledSet {
        InstalledSet {
            revision: Some(revision.into()),
            serial: Some(1),
            installed_at: chrono::Utc::now(),
            files: vec![SetFile {
                name: "test.cvd".into(),
                sha256: sha.into(),
                size: 1,
                version: Some(revision.into()),
                component: None,
                build_time: None,
                dist_sha256: None,
            }],
        }
    }

    fn config(socket: Option<PathBuf>) -> AgentConfig {
        let mut config: AgentConfig = toml::from_str(
            "listen = \"127.0.0.1:7505\"\nengine = \"clamav\"\n\
             database_dir = \"/nonexistent\"\nhost_name = \"h\"\n",
        )
        .unwrap();
        config.clamd_socket = socket;
        config
    }

    #[test]
    fn clamd_is_told_to_reload_through_its_socket() {
        assert!(!reload_engine(&config(None)).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("clamd.sock");
        let server = fake_clamd(&socket, 8, b"RELOADING\0");
        assert!(reload_engine(&config(Some(socket.clone()))).unwrap());
        assert_eq!(&server.join().unwrap(), b"zRELOAD\0");
        // No clamd on the socket: the error says the databases are installed and what to do.
        drop(std::fs::remove_file(&socket));
        let err = reload_engine(&config(Some(socket))).unwrap_err();
        assert!(
            format!("{err:#}").contains("databases are installed"),
            "{err:#}"
        );
    }

    #[test]
    fn backups_rotate_and_keep_three() {
        let dir = tempfile::tempdir().unwrap();
        let mut backups = Vec::new();
        let mut installed: Option<InstalledSet> = None;
        for (i, sha) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            let next = set(&format!("r{i}"), sha);
            backups = commit(dir.path(), &next, installed.as_ref(), backups).unwrap();
            installed = Some(next);
        }
        let (current, stored) = load_sets(dir.path()).unwrap();
        assert_eq!(current.unwrap().files[0].sha256, "e");
        let shas: Vec<_> = stored.iter().map(|s| s.files[0].sha256.clone()).collect();
        assert_eq!(shas, ["d", "c", "b"]);
    }

    #[test]
    fn a_cld_next_to_an_installed_cvd_is_removed_and_leftovers_too() {
        let state = tempfile::tempdir().unwrap();
        let db = state.path().join("db");
        fs::create_dir_all(state.path().join(FILES_DIR)).unwrap();
        fs::create_dir_all(&db).unwrap();
        let bytes = b"database";
        let sha = sha256_hex(bytes);
        fs::write(state.path().join(FILES_DIR).join(&sha), bytes).unwrap();
        fs::write(db.join("test.cld"), b"newer").unwrap();
        fs::write(db.join(".test.cvd.pm-tmp-1"), b"half").unwrap();
        let set = InstalledSet {
            files: vec![SetFile {
                name: "test.cvd".into(),
                sha256: sha,
                size: bytes.len() as u64,
                version: None,
                component: None,
                build_time: None,
                dist_sha256: None,
            }],
            ..set("r1", "x")
        };
        assert!(install_set(state.path(), &db, &set, None).unwrap());
        let mut names: Vec<_> = fs::read_dir(&db)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["test.cvd"]);
        assert_eq!(fs::read(db.join("test.cvd")).unwrap(), bytes);
        assert!(!install_set(state.path(), &db, &set, None).unwrap());
    }

    #[test]
    fn an_update_request_names_dist_or_a_backup_generation_of_the_manager() {
        for dist in ["", "  ", "null", "{}", "{\"generation\": null}"] {
            assert_eq!(
                parse_update_request(dist.as_bytes()),
                Ok((None, None)),
                "{dist:?}"
            );
        }
        for n in 1..=3 {
            let body = format!("{{\"generation\": {n}}}");
            assert_eq!(parse_update_request(body.as_bytes()), Ok((Some(n), None)));
        }
        let held = r#"{"generation": 1, "hold": {"kind": "fleet-rollback", "reason": "job 7",
            "set_by": "ops@manager"}}"#;
        let (generation, hold) = parse_update_request(held.as_bytes()).unwrap();
        assert_eq!(generation, Some(1));
        assert_eq!(hold.unwrap().kind, proto::HoldKind::FleetRollback);
        for (bad, says) in [
            ("{\"generation\": 0}", "generation 0 is not a backup"),
            ("{\"generation\": 4}", "generation 4 is not a backup"),
            ("{\"generation\": \"x\"}", "not valid"),
            ("{\"generation\": -1}", "not valid"),
            ("{\"revision\": \"r3\"}", "unknown field `revision`"),
            ("[1]", "not valid"),
            (
                r#"{"hold": {"kind": "hold", "reason": "", "set_by": "x"}}"#,
                "`reason` must be",
            ),
        ] {
            let problem = parse_update_request(bad.as_bytes()).unwrap_err();
            assert!(problem.contains(says), "{bad}: {problem}");
        }
    }

    #[test]
    fn files_gone_or_of_another_size_are_damaged_and_leave_no_revision_or_version() {
        let db = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let file = |name: &str, size: u64| SetFile {
            name: name.into(),
            sha256: "00".into(),
            size,
            version: Some("6".into()),
            component: None,
            build_time: None,
            dist_sha256: None,
        };
        let set = InstalledSet {
            revision: Some("r5".into()),
            serial: Some(5),
            installed_at: chrono::Utc::now(),
            files: vec![
                file("daily.cvd", 4),
                file("main.cvd", 4),
                file("site.ndb", 4),
                file("test.cvd", 4),
            ],
        };
        fs::write(db.path().join("daily.cvd"), b"abcd").unwrap();
        fs::write(db.path().join("main.cvd"), b"abcdef").unwrap();
        fs::create_dir(db.path().join("site.ndb")).unwrap();
        let names: Vec<String> = damaged_files(db.path(), &set)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names, ["main.cvd", "site.ndb", "test.cvd"]);

        write_json(
            &state.path().join(INSTALLED_FILE),
            &InstallState {
                installed: Some(set),
                backups: Vec::new(),
            },
        )
        .unwrap();
        let polled = installed_state(state.path(), db.path()).unwrap().unwrap();
        assert_eq!(polled.revision, None);
        let versions: Vec<Option<&str>> = polled
            .components
            .iter()
            .map(|c| c.version.as_deref())
            .collect();
        assert_eq!(versions, [Some("6"), None, None, None]);
        assert!(
            polled.damaged[0].ends_with("main.cvd` is 6 bytes, installed as 4"),
            "{:?}",
            polled.damaged
        );
        assert!(polled.damaged[2].starts_with("`test.cvd` is missing from"));
    }
}
