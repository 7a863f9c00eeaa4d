//! `pm-mirror serve`: the private mirror. Serves `repo/dist` at `/<product>/<file>` (so a stock
//! freshclam takes `DatabaseMirror http://HOST:PORT/clamav`), the signed manifest at
//! `/manifest.json` and `/manifest.sig`, the signed dist statement at `/dist.json` and
//! `/dist.sig`, the manifest key's rotation chain at `/keys.json` (and the public key itself at
//! `/manifest-key.pem`, for `pm-agent trust-key`), and the backups under `/backup/<N>/`. Missing files are
//! 404, never 403 or 429: freshclam treats those as a ban and stops asking for a day.

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::clamav;
use crate::static_files::{self, Content};

/// What the server needs: where the repository is, what it knows of the files it served, and
/// what it served so far.
#[derive(Clone)]
pub struct ServeState {
    repo_root: Arc<PathBuf>,
    known: Arc<RwLock<KnownFiles>>,
    served: Arc<Served>,
}

/// What serve keeps of the files it answered, by their path under `repo/view` (like nginx's
/// `open_file_cache`, without keeping them open): each file's identity, its Last-Modified and
/// ETag, and its first [`static_files::READ_AT_ONCE`] bytes, the whole of a cdiff or small CVD
/// and the header a freshclam probe asks of a large one. A request checks the identity with one
/// `stat` of the path: a publish that switches the view, a file replaced or edited by hand all
/// show there, and the entry is made again. A known file's probe then costs that `stat` and the
/// write of the answer, where opening (a walk through the view's links), `fstat`, reading and
/// closing it set serve's rate against nginx's.
#[derive(Default)]
struct KnownFiles {
    files: HashMap<PathBuf, Arc<KnownFile>>,
    /// Bytes of the prefixes kept.
    bytes: u64,
}

/// At most this many bytes of prefixes are kept (dist and three backups hold a few MiB); past
/// it, everything is forgotten and learnt again.
const KNOWN_BYTES: u64 = 32 << 20;

/// One served file, as serve knows it.
struct KnownFile {
    /// Device, inode, size, mtime and ctime (to the nanosecond): a changed file differs here.
    identity: [i64; 7],
    len: u64,
    /// Its first bytes (all of a small file).
    prefix: axum::body::Bytes,
    last_modified: SystemTime,
    etag: String,
    content_type: &'static str,
}

/// What [`KnownFile::identity`] holds of a file's metadata.
fn identity(metadata: &std::fs::Metadata) -> [i64; 7] {
    [
        metadata.dev() as i64,
        metadata.ino() as i64,
        metadata.len() as i64,
        metadata.mtime(),
        metadata.mtime_nsec(),
        metadata.ctime(),
        metadata.ctime_nsec(),
    ]
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
            known: Arc::default(),
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
/// Each segment's percent-escapes are decoded first (clients encode names with a space or a
/// non-ASCII letter, [`crate::manifest::url_path`]); a decoded segment must still be a plain
/// name, so `%2e%2e` and `%2f` lead nowhere.
fn resolve(repo_root: &Path, path: &str) -> Option<PathBuf> {
    let parts: Vec<String> = path
        .strip_prefix('/')
        .unwrap_or(path)
        .split('/')
        .map(crate::manifest::decode_url_segment)
        .collect::<Option<_>>()?;
    let plain = |part: &String| {
        !part.is_empty()
            && part != "."
            && part != ".."
            && !part.starts_with('.')
            && !part.contains(['/', '\\', '\0'])
    };
    if parts.is_empty() || !parts.iter().all(plain) {
        return None;
    }
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let view = repo_root.join("view");
    match parts.as_slice() {
        [name]
            if *name == crate::dist_statement::STATEMENT_FILE
                || *name == crate::dist_statement::SIGNATURE_FILE
                || *name == crate::pki::rotation::SERVED_FILE =>
        {
            Some(view.join(name))
        }
        [name] if *name == crate::pki::rotation::SERVED_PUBLIC_KEY => Some(
            repo_root
                .parent()?
                .join(crate::pki::SIGNING_PUBLIC_KEY_FILE),
        ),
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
    // The file system calls here run on the async worker: `stat`, `open` and reading a few KiB
    // from the page cache take microseconds, less than a trip to a blocking thread and back
    // (large bodies are streamed from blocking threads, see `static_files`).
    let Ok(metadata) = std::fs::metadata(&path) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if !metadata.is_file() {
        return StatusCode::NOT_FOUND.into_response();
    }
    let known = state
        .known
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .files
        .get(&path)
        .filter(|known| known.identity == identity(&metadata))
        .cloned();
    let mut opened = None;
    let known = match known {
        Some(known) => known,
        None => {
            let Some((known, file)) = learn(&path) else {
                return StatusCode::NOT_FOUND.into_response();
            };
            let known = Arc::new(known);
            let mut kept = state
                .known
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let size = known.prefix.len() as u64;
            if kept.bytes + size > KNOWN_BYTES {
                *kept = KnownFiles::default();
            }
            if let Some(old) = kept.files.insert(path.clone(), Arc::clone(&known)) {
                kept.bytes -= old.prefix.len() as u64;
            }
            kept.bytes += size;
            opened = Some(file);
            known
        }
    };
    let wanted = static_files::body_range(
        request.method(),
        request.headers(),
        known.len,
        known.last_modified,
        &known.etag,
    );
    let content = match wanted {
        Some((start, len)) if start + len > known.prefix.len() as u64 => {
            // Past the prefix: the file itself, which must still be the one described.
            let file = match opened {
                Some(file) => file,
                None => match std::fs::File::open(&path) {
                    Ok(file)
                        if file
                            .metadata()
                            .is_ok_and(|m| identity(&m) == known.identity) =>
                    {
                        file
                    }
                    // Changed since the `stat` above: the next request learns it again.
                    _ => return StatusCode::NOT_FOUND.into_response(),
                },
            };
            Content::File {
                file: Arc::new(file),
                len: known.len,
            }
        }
        _ => Content::Prefix {
            bytes: known.prefix.clone(),
            len: known.len,
        },
    };
    static_files::respond(
        request.method(),
        request.headers(),
        content,
        known.last_modified,
        &known.etag,
        known.content_type,
    )
    .await
}

/// Opens a file of the view and learns what serve keeps of it; `None` when it is not a plain
/// file that can be read. Everything comes from the one open file, which is returned too: a
/// publish may switch the view meanwhile, and headers and bytes must describe the same file.
fn learn(path: &Path) -> Option<(KnownFile, std::fs::File)> {
    let file = std::fs::File::open(path).ok()?;
    let metadata = file.metadata().ok().filter(|m| m.is_file())?;
    let mtime = metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let len = metadata.len();
    let mut prefix = vec![0u8; len.min(static_files::READ_AT_ONCE) as usize];
    file.read_exact_at(&mut prefix, 0).ok()?;
    let last_modified = if name.ends_with(".cvd") || name.ends_with(".cld") {
        // freshclam sends the local database's build time as If-Modified-Since and takes 304 as
        // "up to date": the served CVD's build time is exactly the right Last-Modified.
        cvd_build_time(&prefix).unwrap_or(mtime)
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
    let known = KnownFile {
        identity: identity(&metadata),
        len,
        prefix: prefix.into(),
        last_modified,
        etag,
        content_type,
    };
    Some((known, file))
}

/// The build time in a CVD header (the file's first bytes), when it is a time HTTP can express.
fn cvd_build_time(prefix: &[u8]) -> Option<SystemTime> {
    let header = clamav::parse_cvd_header(prefix).ok()?;
    let seconds = u64::try_from(header.build_time_unix).ok()?;
    // HTTP dates end at year 9999; a file claiming a later build time keeps its mtime.
    (seconds < 253_402_300_800).then(|| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

/// Serves until SIGINT or SIGTERM, then says on stderr how much it served.
pub async fn run(listener: tokio::net::TcpListener, state: ServeState) -> std::io::Result<()> {
    // A file body goes out after its headers in a second write: without TCP_NODELAY, Nagle's
    // algorithm holds it until the client's delayed ACK, 40 ms per request on a kept-alive
    // connection (28 requests/s on one connection, the CPU idle).
    let listener = axum::serve::ListenerExt::tap_io(listener, |stream| {
        let _ = stream.set_nodelay(true);
    });
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
        check("/keys.json", Some("/h/repo/view/keys.json"));
        check("/manifest-key.pem", Some("/h/pki/manifest-signing.pub.pem"));
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
        check("/clamav/a%2fb", None);
        check("/clamav/%2elock", None);
        check("/clamav/%ff", None);
        check(
            "/vendor/release%20notes.txt",
            Some("/h/repo/view/dist/vendor/release notes.txt"),
        );
        check(
            "/vendor/%C3%BCber%2Bsig.hdb",
            Some("/h/repo/view/dist/vendor/über+sig.hdb"),
        );
        check("/.lock", None);
        check("/", None);
        check("//clamav/test.cvd", None);
    }
}
