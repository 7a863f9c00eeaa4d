//! The lab upstream (DESIGN.md section 8): a vendor update server on loopback that serves
//! ClamAV's officially signed test databases at a chosen version, a `files` feed, and injects
//! faults on demand (429, 403, 500, slow answers, truncated or corrupted bodies). Tests drive it
//! in-process; `pm-lab upstream` runs it for the demo and benchmarks, controlled over
//! `/_lab/...`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::clamav;
use crate::static_files::{self, Content};

/// Environment variable that points at ClamAV's test databases.
pub const TESTDB_ENV: &str = "PM_CLAMAV_TESTDB";

/// The directory of ClamAV's test databases: `$PM_CLAMAV_TESTDB`, else `../shared/clamav-testdb`
/// next to the source tree.
pub fn testdb_dir() -> PathBuf {
    match std::env::var_os(TESTDB_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/clamav-testdb"),
    }
}

/// A fault the upstream injects into matching requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum FaultKind {
    /// HTTP 429 with an optional Retry-After in seconds.
    TooManyRequests { retry_after: Option<u64> },
    /// HTTP 403.
    Forbidden,
    /// HTTP 500.
    ServerError,
    /// Answer after a delay.
    Slow { millis: u64 },
    /// Announce the full length, send half the body, then drop the connection (full GETs only).
    Truncate,
    /// Flip one byte in the second half of the body (full GETs only).
    CorruptByte,
    /// Serve `test-<version>.cvd` for full downloads of test.cvd while header reads see the
    /// current version: a CDN whose edges disagree.
    StaleBody { version: u32 },
    /// Change one character of a CVD header's digital signature: the MD5 still matches, the
    /// RSA signature no longer does.
    BadSignature,
    /// Serve these bytes instead of the file (header reads and full GETs alike, and also for a
    /// path the lab does not have): whatever a broken or hostile upstream may send.
    Replace { body: Vec<u8> },
}

/// A fault and which requests it hits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// What happens.
    #[serde(flatten)]
    pub kind: FaultKind,
    /// Only paths ending with this (`test.cvd`); every path when absent.
    #[serde(default)]
    pub path_suffix: Option<String>,
    /// How many requests it hits before it disappears; forever when absent.
    #[serde(default)]
    pub times: Option<u32>,
}

/// One request the upstream answered, for tests to assert on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoggedRequest {
    /// GET or HEAD.
    pub method: String,
    /// Request path.
    pub path: String,
    /// `Range` header.
    pub range: Option<String>,
    /// `If-Modified-Since` header.
    pub if_modified_since: Option<String>,
    /// `If-None-Match` header.
    pub if_none_match: Option<String>,
    /// Status answered (0 while the answer is still being prepared).
    pub status: u16,
    /// Body bytes in the answer (what a complete transfer carries).
    pub body_bytes: u64,
}

/// A file of the lab's `files` feed.
#[derive(Debug, Clone)]
struct FeedFile {
    path: String,
    disk_path: PathBuf,
    size: u64,
    sha256: String,
}

#[derive(Default)]
struct LabState {
    testdb: PathBuf,
    version: u32,
    faults: Vec<Fault>,
    requests: Vec<LoggedRequest>,
    feed_version: String,
    feed: Vec<FeedFile>,
}

/// A running (or ready to run) lab upstream.
#[derive(Clone)]
pub struct LabUpstream {
    state: Arc<Mutex<LabState>>,
}

/// Control query of `/_lab/version`.
#[derive(Debug, Deserialize)]
struct VersionQuery {
    n: u32,
}

impl LabUpstream {
    /// An upstream serving `testdb` at ClamAV test database `version` (1..=6).
    pub fn new(testdb: &Path, version: u32) -> anyhow::Result<LabUpstream> {
        let lab = LabUpstream {
            state: Arc::new(Mutex::new(LabState::default())),
        };
        lab.state().testdb = testdb.to_owned();
        lab.set_version(version)?;
        Ok(lab)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LabState> {
        // A panic while holding the lock only happens in a failing test; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Moves the ClamAV feed to `version`: test.cvd becomes test-`version`.cvd and the cdiffs up to
    /// it appear.
    pub fn set_version(&self, version: u32) -> anyhow::Result<()> {
        let testdb = self.state().testdb.clone();
        let cvd = testdb.join(format!("test-{version}.cvd"));
        anyhow::ensure!(
            cvd.is_file(),
            "no `{}`: the lab serves ClamAV's test databases 1..=6 (set {TESTDB_ENV})",
            cvd.display()
        );
        self.state().version = version;
        Ok(())
    }

    /// The ClamAV test database version served.
    pub fn version(&self) -> u32 {
        self.state().version
    }

    /// Serves every file under `dir` as the `files` feed at `/vendor/`, with an index at
    /// `/vendor/index.json` of the given version.
    pub fn set_feed(&self, dir: &Path, version: &str) -> anyhow::Result<()> {
        let mut feed = Vec::new();
        collect_feed(dir, dir, &mut feed)?;
        feed.sort_by(|a, b| a.path.cmp(&b.path));
        let mut state = self.state();
        state.feed = feed;
        state.feed_version = version.to_string();
        Ok(())
    }

    /// Adds a fault.
    pub fn inject(&self, fault: Fault) {
        self.state().faults.push(fault);
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    /// Requests answered so far.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.state().requests.clone()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.state().requests.clear();
    }

    /// The routes: the feeds plus the `/_lab/` control API.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/_lab/version", post(control_version))
            .route("/_lab/fault", post(control_fault))
            .route("/_lab/clear", post(control_clear))
            .route("/_lab/requests", get(control_requests))
            .fallback(serve_upstream)
            .with_state(self.clone())
    }

    /// Binds `addr` and serves in a background task; returns the bound address.
    pub async fn spawn(&self, addr: &str) -> anyhow::Result<std::net::SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let listener = axum::serve::ListenerExt::tap_io(listener, |stream| {
            let _ = stream.set_nodelay(true);
        });
        let router = self.router();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(local)
    }

    fn take_fault(&self, path: &str, full_get: bool) -> Option<FaultKind> {
        let mut state = self.state();
        let index = state.faults.iter().position(|fault| {
            let path_matches = fault
                .path_suffix
                .as_deref()
                .is_none_or(|s| path.ends_with(s));
            let body_fault = matches!(
                fault.kind,
                FaultKind::Truncate | FaultKind::CorruptByte | FaultKind::StaleBody { .. }
            );
            let applies = full_get || !body_fault;
            path_matches && applies
        })?;
        let fault = &mut state.faults[index];
        let kind = fault.kind.clone();
        match fault.times {
            Some(1) => {
                state.faults.remove(index);
            }
            Some(n) => fault.times = Some(n - 1),
            None => {}
        }
        Some(kind)
    }

    /// The bytes and build time of a file of the ClamAV feed at the current version.
    fn clamav_file(&self, name: &str) -> Option<(Bytes, SystemTime)> {
        let (testdb, version) = {
            let state = self.state();
            (state.testdb.clone(), state.version)
        };
        let read = |file: String| std::fs::read(testdb.join(file)).ok().map(Bytes::from);
        let build_time = |v: u32| {
            let bytes = std::fs::read(testdb.join(format!("test-{v}.cvd"))).ok()?;
            let header = clamav::parse_cvd_header(&bytes).ok()?;
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(header.build_time_unix as u64))
        };
        match name {
            "test.cvd" => Some((read(format!("test-{version}.cvd"))?, build_time(version)?)),
            _ => {
                let rest = name.strip_prefix("test-")?;
                let (number, suffix) = rest.split_once('.')?;
                let number: u32 = number.parse().ok()?;
                // ClamAV names a CVD's detached signature after its version: test-6.cvd.sign.
                if number > version || !matches!(suffix, "cdiff" | "cdiff.sign" | "cvd.sign") {
                    return None;
                }
                Some((
                    read(format!("test-{number}.{suffix}"))?,
                    build_time(number)?,
                ))
            }
        }
    }

    fn feed_index(&self) -> Bytes {
        #[derive(Serialize)]
        struct Entry<'a> {
            path: &'a str,
            size: u64,
            sha256: &'a str,
            version: &'a str,
        }
        let state = self.state();
        let files: Vec<Entry> = state
            .feed
            .iter()
            .map(|f| Entry {
                path: &f.path,
                size: f.size,
                sha256: &f.sha256,
                version: &state.feed_version,
            })
            .collect();
        let index = serde_json::json!({ "version": state.feed_version, "files": files });
        Bytes::from(serde_json::to_vec_pretty(&index).expect("index serializes"))
    }
}

fn collect_feed(root: &Path, dir: &Path, out: &mut Vec<FeedFile>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_feed(root, &path, out)?;
            continue;
        }
        let relative = path.strip_prefix(root)?.to_string_lossy().into_owned();
        if relative == "index.json" {
            continue;
        }
        let (size, sha256) = crate::mirror::hash_file(&path)?;
        out.push(FeedFile {
            path: relative,
            disk_path: path,
            size,
            sha256,
        });
    }
    Ok(())
}

async fn control_version(
    State(lab): State<LabUpstream>,
    Query(query): Query<VersionQuery>,
) -> Response {
    match lab.set_version(query.n) {
        Ok(()) => (StatusCode::OK, format!("version {}\n", query.n)).into_response(),
        Err(err) => (StatusCode::BAD_REQUEST, format!("{err:#}\n")).into_response(),
    }
}

async fn control_fault(State(lab): State<LabUpstream>, Json(fault): Json<Fault>) -> StatusCode {
    lab.inject(fault);
    StatusCode::NO_CONTENT
}

async fn control_clear(State(lab): State<LabUpstream>) -> StatusCode {
    lab.clear_faults();
    lab.clear_requests();
    StatusCode::NO_CONTENT
}

async fn control_requests(State(lab): State<LabUpstream>) -> Json<Vec<LoggedRequest>> {
    Json(lab.requests())
}

async fn serve_upstream(State(lab): State<LabUpstream>, request: Request) -> Response {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    let headers = request.headers().clone();
    drop(request);
    let text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let range = text(header::RANGE);
    let full_get = range.is_none() && method == axum::http::Method::GET;
    let fault = lab.take_fault(&path, full_get);
    // Logged on arrival, so a test can see a request that is still being answered.
    let index = {
        let mut state = lab.state();
        state.requests.push(LoggedRequest {
            method: method.to_string(),
            path: path.clone(),
            range: range.clone(),
            if_modified_since: text(header::IF_MODIFIED_SINCE),
            if_none_match: text(header::IF_NONE_MATCH),
            status: 0,
            body_bytes: 0,
        });
        state.requests.len() - 1
    };
    let response = answer(&lab, &method, &headers, &path, fault).await;
    let body_bytes = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .filter(|_| method == axum::http::Method::GET)
        .unwrap_or(0);
    if let Some(logged) = lab.state().requests.get_mut(index) {
        logged.status = response.status().as_u16();
        logged.body_bytes = body_bytes;
    }
    response
}

async fn answer(
    lab: &LabUpstream,
    method: &axum::http::Method,
    headers: &axum::http::HeaderMap,
    path: &str,
    fault: Option<FaultKind>,
) -> Response {
    match &fault {
        Some(FaultKind::TooManyRequests { retry_after }) => {
            let mut response = (StatusCode::TOO_MANY_REQUESTS, "slow down\n").into_response();
            if let Some(value) = retry_after.and_then(|s| s.to_string().parse().ok()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            return response;
        }
        Some(FaultKind::Forbidden) => {
            return (StatusCode::FORBIDDEN, "forbidden\n").into_response();
        }
        Some(FaultKind::ServerError) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "injected failure\n").into_response();
        }
        Some(FaultKind::Slow { millis }) => {
            tokio::time::sleep(Duration::from_millis(*millis)).await
        }
        _ => {}
    }
    let found = if let Some(name) = path.strip_prefix("/clamav/") {
        lab.clamav_file(name)
            .map(|(bytes, time)| (Content::Memory(bytes), time))
    } else if path == "/vendor/index.json" {
        Some((
            Content::Memory(lab.feed_index()),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        ))
    } else if let Some(name) = path.strip_prefix("/vendor/") {
        // Clients percent-encode names with a space or a non-ASCII letter.
        let name = crate::manifest::decode_url_segment(name).unwrap_or_default();
        let feed_file = lab.state().feed.iter().find(|f| f.path == name).cloned();
        match feed_file {
            Some(f) => match std::fs::File::open(&f.disk_path) {
                Ok(file) => {
                    let modified = std::fs::metadata(&f.disk_path)
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    let file = Arc::new(file);
                    Some((Content::File { file, len: f.size }, modified))
                }
                Err(_) => None,
            },
            None => None,
        }
    } else {
        None
    };
    let found = match (&fault, found) {
        (Some(FaultKind::Replace { body }), _) => Some((
            Content::Memory(Bytes::from(body.clone())),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        )),
        (Some(FaultKind::StaleBody { version }), Some((_, modified)))
            if path.ends_with("/test.cvd") =>
        {
            let bytes = std::fs::read(lab.state().testdb.join(format!("test-{version}.cvd")));
            bytes
                .ok()
                .map(|b| (Content::Memory(Bytes::from(b)), modified))
        }
        (_, found) => found,
    };
    let Some((content, modified)) = found else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    let etag = etag_of(&content, modified);
    let content = match (fault, content) {
        (Some(FaultKind::CorruptByte), Content::Memory(bytes)) => {
            let mut corrupted = bytes.to_vec();
            let at = corrupted.len() * 3 / 4;
            if let Some(byte) = corrupted.get_mut(at) {
                *byte ^= 0x5a;
            }
            Content::Memory(Bytes::from(corrupted))
        }
        (Some(FaultKind::BadSignature), Content::Memory(bytes)) => {
            Content::Memory(Bytes::from(forge_dsig(&bytes)))
        }
        (Some(FaultKind::Truncate), Content::Memory(bytes)) => {
            return truncated_response(bytes);
        }
        (_, content) => content,
    };
    static_files::respond(
        method,
        headers,
        content,
        modified,
        &etag,
        "application/octet-stream",
    )
    .await
}

/// A copy of a CVD whose header's dsig field (the sixth) has one character changed.
fn forge_dsig(cvd: &[u8]) -> Vec<u8> {
    let mut forged = cvd.to_vec();
    let colons: Vec<usize> = forged
        .iter()
        .take(clamav::CVD_HEADER_LEN)
        .enumerate()
        .filter(|(_, byte)| **byte == b':')
        .map(|(i, _)| i)
        .collect();
    // Fields: ClamAV-VDB:time:version:sigs:flevel:md5:dsig:...; the dsig follows the sixth colon.
    if let Some(byte) = colons.get(5).and_then(|at| forged.get_mut(at + 1)) {
        *byte = if *byte == b'a' { b'b' } else { b'a' };
    }
    forged
}

fn etag_of(content: &Content, modified: SystemTime) -> String {
    let seconds = modified
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match content {
        Content::Memory(bytes) => {
            format!(
                "\"{}\"",
                &crate::manifest::hex(&openssl::sha::sha256(bytes))[..16]
            )
        }
        Content::File { len, .. } | Content::Prefix { len, .. } => {
            format!("\"{len:x}-{seconds:x}\"")
        }
    }
}

/// Announces the whole length, sends half, then fails the stream so the connection drops.
fn truncated_response(bytes: Bytes) -> Response {
    let half = bytes.slice(..bytes.len() / 2);
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(half),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "injected truncation",
        )),
    ];
    let mut response = Body::from_stream(futures_util::stream::iter(chunks)).into_response();
    if let Ok(value) = bytes.len().to_string().parse() {
        response.headers_mut().insert(header::CONTENT_LENGTH, value);
    }
    response
}

/// A forward HTTP proxy for tests of `[proxy]` and `HTTP_PROXY`: it requires Basic credentials
/// when given some, and counts the requests it forwarded.
#[derive(Clone)]
pub struct LabProxy {
    expected_authorization: Option<String>,
    forwarded: Arc<std::sync::atomic::AtomicU64>,
    refused: Arc<std::sync::atomic::AtomicU64>,
    client: reqwest::Client,
}

impl LabProxy {
    /// A proxy that demands `username:password` when given.
    pub fn new(credentials: Option<(&str, &str)>) -> anyhow::Result<LabProxy> {
        Ok(LabProxy {
            expected_authorization: credentials.map(|(user, password)| {
                format!(
                    "Basic {}",
                    openssl::base64::encode_block(format!("{user}:{password}").as_bytes())
                )
            }),
            forwarded: Arc::default(),
            refused: Arc::default(),
            client: reqwest::Client::builder()
                .no_proxy()
                .tcp_nodelay(true)
                .build()?,
        })
    }

    /// Requests forwarded so far.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests refused with 407 so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Binds `addr` and proxies in a background task; returns the bound address.
    pub async fn spawn(&self, addr: &str) -> anyhow::Result<std::net::SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let router = Router::new().fallback(forward).with_state(self.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(local)
    }
}

async fn forward(State(proxy): State<LabProxy>, request: Request) -> Response {
    use std::sync::atomic::Ordering;
    let given = request
        .headers()
        .get(header::PROXY_AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Some(expected) = &proxy.expected_authorization
        && given != Some(expected.as_str())
    {
        proxy.refused.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            [(header::PROXY_AUTHENTICATE, "Basic realm=\"lab\"")],
        )
            .into_response();
    }
    if request.uri().scheme().is_none() {
        return (StatusCode::BAD_REQUEST, "absolute-form request expected\n").into_response();
    }
    proxy.forwarded.fetch_add(1, Ordering::Relaxed);
    let mut outgoing = proxy
        .client
        .request(request.method().clone(), request.uri().to_string());
    for (name, value) in request.headers() {
        let hop_by_hop = [
            header::PROXY_AUTHORIZATION,
            header::CONNECTION,
            header::HOST,
        ];
        if !hop_by_hop.contains(name) {
            outgoing = outgoing.header(name, value);
        }
    }
    match outgoing.send().await {
        Ok(upstream) => {
            let mut response = Response::builder().status(upstream.status());
            for (name, value) in upstream.headers() {
                if name != header::TRANSFER_ENCODING && name != header::CONNECTION {
                    response = response.header(name, value);
                }
            }
            response
                .body(Body::from_stream(upstream.bytes_stream()))
                .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

/// Parses a fault given on the `pm-lab` command line, e.g. `429:retry_after=60,path=test.cvd,times=1`.
pub fn parse_fault(text: &str) -> Result<Fault, String> {
    let (kind, options) = text.split_once(':').unwrap_or((text, ""));
    let options: BTreeMap<&str, &str> = options
        .split(',')
        .filter(|o| !o.is_empty())
        .filter_map(|o| o.split_once('='))
        .collect();
    let number = |key: &str| {
        options
            .get(key)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("`{key}={v}` is not a number"))
            })
            .transpose()
    };
    let kind = match kind {
        "429" => FaultKind::TooManyRequests {
            retry_after: number("retry_after")?,
        },
        "403" => FaultKind::Forbidden,
        "500" => FaultKind::ServerError,
        "slow" => FaultKind::Slow {
            millis: number("millis")?.unwrap_or(5000),
        },
        "truncate" => FaultKind::Truncate,
        "corrupt" => FaultKind::CorruptByte,
        "bad_signature" => FaultKind::BadSignature,
        other => {
            return Err(format!(
                "unknown fault `{other}`: use 429, 403, 500, slow, truncate, corrupt or bad_signature"
            ));
        }
    };
    Ok(Fault {
        kind,
        path_suffix: options.get("path").map(|p| p.to_string()),
        times: number("times")?.map(|t| t as u32),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_from_the_command_line() {
        assert_eq!(
            parse_fault("429:retry_after=60,path=test.cvd,times=1").unwrap(),
            Fault {
                kind: FaultKind::TooManyRequests {
                    retry_after: Some(60)
                },
                path_suffix: Some("test.cvd".into()),
                times: Some(1),
            }
        );
        assert_eq!(parse_fault("corrupt").unwrap().kind, FaultKind::CorruptByte);
        assert!(parse_fault("teapot").is_err());
        assert!(parse_fault("slow:millis=x").is_err());
    }
}
