//! `pm-mirror serve`: the private mirror. Serves `repo/dist` at `/<product>/<file>` (so a stock
//! freshclam takes `DatabaseMirror http://HOST:PORT/clamav`), the signed manifest at
//! `/manifest.json` and `/manifest.sig`, the signed dist statement at `/dist.json` and
//! `/dist.sig`, and the backups under `/backup/<N>/`. Missing files are
//! 404, never 403 or 429: freshclam treats those as a ban and stops asking for a day.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::clamav;
use crate::static_files::{self, Content};

/// What the server needs: where the repository is, and what it served so far.
#[derive(Clone)]
pub struct ServeState {
    repo_root: Arc<PathBuf>,
    served: Arc<Served>,
}

/// Requests answered, and the body bytes of the answers to GET (their `Content-Length`: what a
/// complete transfer carries; a client that hangs up early is counted in full).
#[derive(Debug, Default)]
pub struct Served {
    /// Requests answered, whatever their status.
    pub requests: AtomicU64,
    /// Body bytes of the answers to GET.
    pub bytes: AtomicU64,
}

impl ServeState {
    /// Serves the repository rooted at `repo_root` (`PM_HOME/repo`).
    pub fn new(repo_root: PathBuf) -> ServeState {
        ServeState {
            repo_root: Arc::new(repo_root),
            served: Arc::default(),
        }
    }

    /// What was served so far.
    pub fn served(&self) -> &Served {
        &self.served
    }
}

/// The mirror's routes: every path is a file lookup in the current view.
pub fn router(state: ServeState) -> Router {
    Router::new().fallback(serve_file).with_state(state)
}

/// Maps a request path to a file under the current view, refusing anything but plain names.
fn resolve(repo_root: &Path, path: &str) -> Option<PathBuf> {
    let parts: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let plain = |part: &&str| {
        !part.is_empty()
            && *part != "."
            && *part != ".."
            && !part.starts_with('.')
            && !part.contains(['%', '\\', '\0'])
    };
    if parts.is_empty() || !parts.iter().all(plain) {
        return None;
    }
    let view = repo_root.join("view");
    match parts.as_slice() {
        [name]
            if *name == crate::dist_statement::STATEMENT_FILE
                || *name == crate::dist_statement::SIGNATURE_FILE =>
        {
            Some(view.join(name))
        }
        ["backup", generation, rest @ ..] if !rest.is_empty() => {
            let generation: usize = generation.parse().ok()?;
            if !(1..=crate::repo::BACKUP_GENERATIONS).contains(&generation) {
                return None;
            }
            Some(rest.iter().fold(
                view.join("backup").join(generation.to_string()),
                |p, part| p.join(part),
            ))
        }
        _ => Some(parts.iter().fold(view.join("dist"), |p, part| p.join(part))),
    }
}

/// Answers one request and logs it, like an access log: method, path, status, body bytes.
async fn serve_file(State(state): State<ServeState>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = answer(&state, request).await;
    let bytes = if method == Method::GET {
        response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|len| len.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(0)
    } else {
        0
    };
    state.served.requests.fetch_add(1, Ordering::Relaxed);
    state.served.bytes.fetch_add(bytes, Ordering::Relaxed);
    tracing::debug!(%method, %path, status = response.status().as_u16(), bytes, "served");
    response
}

async fn answer(state: &ServeState, request: Request) -> Response {
    let Some(path) = resolve(&state.repo_root, request.uri().path()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    // Open once and take everything from the open file: a publish may switch the view between
    // two lookups, and headers and bytes must describe the same file.
    let Ok(mut file) = tokio::fs::File::open(&path).await else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let metadata = match file.metadata().await {
        Ok(metadata) if metadata.is_file() => metadata,
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let mtime = metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let last_modified = if name.ends_with(".cvd") || name.ends_with(".cld") {
        // freshclam sends the local database's build time as If-Modified-Since and takes 304 as
        // "up to date": the served CVD's build time is exactly the right Last-Modified.
        cvd_build_time(&mut file).await.unwrap_or(mtime)
    } else {
        mtime
    };
    // Revision files are immutable and hard-linked across revisions, so inode, size and mtime
    // identify the content.
    let etag = format!(
        "\"{:x}-{:x}-{:x}\"",
        metadata.ino(),
        metadata.len(),
        metadata.mtime()
    );
    let content_type = if name.ends_with(".json") {
        "application/json"
    } else {
        "application/octet-stream"
    };
    static_files::respond(
        request.method(),
        request.headers(),
        Content::File {
            file,
            len: metadata.len(),
        },
        last_modified,
        &etag,
        content_type,
    )
    .await
}

/// The build time in a CVD header, read from the open file (which is rewound), when it is a
/// time HTTP can express.
async fn cvd_build_time(file: &mut tokio::fs::File) -> Option<SystemTime> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut header = vec![0u8; clamav::CVD_HEADER_LEN];
    let read = file.read_exact(&mut header).await;
    file.seek(std::io::SeekFrom::Start(0)).await.ok()?;
    read.ok()?;
    let header = clamav::parse_cvd_header(&header).ok()?;
    let seconds = u64::try_from(header.build_time_unix).ok()?;
    // HTTP dates end at year 9999; a file claiming a later build time keeps its mtime.
    (seconds < 253_402_300_800).then(|| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

/// Serves until SIGINT or SIGTERM, then says on stderr how much it served.
pub async fn run(listener: tokio::net::TcpListener, state: ServeState) -> std::io::Result<()> {
    axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    let served = state.served();
    eprintln!(
        "served {} requests, {} body bytes",
        served.requests.load(Ordering::Relaxed),
        served.bytes.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Resolves on SIGINT or SIGTERM, so systemd stops the server cleanly.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_map_into_dist_and_backups_only() {
        let root = Path::new("/h/repo");
        let check = |path: &str, expected: Option<&str>| {
            assert_eq!(resolve(root, path), expected.map(PathBuf::from), "{path}");
        };
        check(
            "/clamav/test.cvd",
            Some("/h/repo/view/dist/clamav/test.cvd"),
        );
        check("/manifest.json", Some("/h/repo/view/dist/manifest.json"));
        check("/dist.json", Some("/h/repo/view/dist.json"));
        check("/dist.sig", Some("/h/repo/view/dist.sig"));
        check("/state.json", Some("/h/repo/view/dist/state.json"));
        check(
            "/backup/2/clamav/test.cvd",
            Some("/h/repo/view/backup/2/clamav/test.cvd"),
        );
        check("/backup/4/clamav/test.cvd", None);
        check("/backup/0/manifest.json", None);
        check("/../etc/passwd", None);
        check("/clamav/../../etc/passwd", None);
        check("/clamav/%2e%2e/x", None);
        check("/.lock", None);
        check("/", None);
        check("//clamav/test.cvd", None);
    }
}
