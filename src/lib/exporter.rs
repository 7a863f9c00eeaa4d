//! `pm-exporter`: serves `/metrics` (Prometheus text 0.0.4, or OpenMetrics 1.0 when the
//! `Accept` header asks for it) and `/healthz` from snapshots of the inventory.
//!
//! The inventory is a DuckDB file that one process may hold for writing (pm-poll, pm-push) or
//! many read-only, never both. So the exporter never keeps it open: a background task opens it
//! read-only once per `--refresh`, without waiting for a lock, runs a few set-based queries
//! (`Inventory::metrics_snapshot`), closes it, renders the exposition text and swaps it in: the
//! gauge families once (they read the same in both formats), the few `*_info` families once
//! per format. A scrape copies nothing large: it writes the cached text and the exporter's own
//! few series, and never waits for a read once a snapshot exists. When the file is busy, missing, replaced or broken, the last good snapshot keeps
//! being served, `pm_inventory_read_errors_total` counts the failure, its age grows, and a
//! warning is logged once per kind of failure until a read succeeds again.

pub mod render;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Parser;
use ipnet::IpNet;
use tokio::sync::{Notify, watch};

use crate::cli::{self, ExitStatus, GlobalArgs, UserError};
use crate::inventory::{Inventory, InventoryError};
use crate::tls::{ClientAuth, TlsConnectInfo, TlsListener, TlsServerConfig};
use render::{ExporterValues, Format, Part, SnapshotData};

/// How long a scrape waits for a refresh it started before it serves the last snapshot.
const SCRAPE_WAIT: Duration = Duration::from_secs(1);

/// `pm-exporter` command line.
#[derive(Debug, Parser)]
#[command(
    name = "pm-exporter",
    version,
    about = "Serve the inventory as Prometheus metrics (/metrics) and a health check (/healthz)"
)]
pub struct Args {
    /// Manager state directory [default: /var/lib/pm as root, else $XDG_DATA_HOME/pm]
    #[arg(long, env = "PM_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:9745 or 127.0.0.1:9745
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Answer only peers in this network (repeatable); others get 403. Default: everyone.
    /// IPv4-mapped IPv6 networks (::ffff:10.0.0.0/104) are read as the IPv4 ones they name
    #[arg(long = "allow", value_name = "CIDR", value_parser = parse_allow)]
    pub allow: Vec<IpNet>,
    /// Read the inventory at most this often (e.g. 15s, 1m)
    #[arg(long, default_value = "15s", value_parser = cli::parse_nonzero_duration, value_name = "DURATION")]
    pub refresh: Duration,
    /// Serve HTTPS with this certificate (PEM; needs --tls-key)
    #[arg(long, requires = "tls_key", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM, mode 0600)
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// More logging on stderr (-v info, -vv debug)
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr
    #[arg(short, long)]
    pub quiet: bool,
}

impl Args {
    /// The shared flags, for `cli::init_logging` and the default home.
    pub fn global(&self) -> GlobalArgs {
        GlobalArgs {
            home: self.home.clone(),
            json: false,
            dry_run: false,
            lock_timeout: Duration::ZERO,
            verbose: self.verbose,
            quiet: self.quiet,
        }
    }
}

/// An `--allow` network. A dual-stack listener (`[::]:P`) sees an IPv4 client as
/// `::ffff:a.b.c.d`, and [`only_allowed`] matches it as the IPv4 address it is, so an
/// IPv4-mapped entry is turned into that IPv4 network; one shorter than /96 would also cover
/// IPv6 addresses that are not mapped, and is refused.
fn parse_allow(text: &str) -> Result<IpNet, String> {
    let net: IpNet = text
        .trim()
        .parse()
        .map_err(|err| format!("`{text}` is not a network ({err}): write e.g. 10.0.0.0/8"))?;
    let IpNet::V6(v6) = net else {
        return Ok(net);
    };
    // As written: `::ffff:0:0/95` names mapped addresses, though its network is not.
    let Some(v4) = v6.addr().to_ipv4_mapped() else {
        return Ok(net);
    };
    match v6.prefix_len().checked_sub(96) {
        Some(prefix) => Ok(IpNet::V4(
            ipnet::Ipv4Net::new(v4, prefix)
                .expect("0..=32 is an IPv4 prefix length")
                .trunc(),
        )),
        None => Err(format!(
            "`{text}` covers IPv4-mapped and other IPv6 addresses at once: give the IPv4 \
             network (e.g. 0.0.0.0/0) and the IPv6 one as two --allow flags"
        )),
    }
}

/// Runs `pm-exporter` until SIGINT or SIGTERM.
pub fn run(args: Args) -> anyhow::Result<ExitStatus> {
    if args.refresh.is_zero() {
        return Err(UserError::usage("`--refresh` must be longer than zero")
            .with_hint("pass e.g. --refresh 15s")
            .into());
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(load_tls(cert, key)?),
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args, tls))
}

fn load_tls(cert: &Path, key: &Path) -> anyhow::Result<TlsServerConfig> {
    let hint = "pass a PEM certificate and its PEM private key (mode 0600)";
    let key = crate::pki::ca::load_private_key(key)
        .map_err(|err| UserError::usage(err.to_string()).with_hint(hint))?;
    let cert = crate::pki::ca::load_certificate(cert)
        .map_err(|err| UserError::usage(err.to_string()).with_hint(hint))?;
    Ok(TlsServerConfig {
        key,
        cert,
        client_auth: ClientAuth::None,
    })
}

async fn serve(args: Args, tls: Option<TlsServerConfig>) -> anyhow::Result<ExitStatus> {
    let home = args.global().home();
    let tcp = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|err| {
            UserError::failure(format!("cannot listen on `{}`: {err}", args.listen))
                .with_hint("pick a free address with --listen")
        })?;
    let local = tcp.local_addr()?;
    let exporter = Exporter::new(home.clone(), args.refresh);
    tokio::spawn(Arc::clone(&exporter).refresh_loop());
    let app = router(exporter, args.allow.clone());
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(address = %local, home = %home.display(), "serving metrics");
    // Tests and people read the address from this line (port 0 picks a free one).
    eprintln!(
        "serving metrics of {} on {scheme}://{local}/",
        home.display()
    );
    match tls {
        Some(config) => {
            let listener = TlsListener::new(tcp, &config)?;
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<TlsConnectInfo>(),
            )
            .with_graceful_shutdown(crate::mirror::shutdown_signal())
            .await?;
        }
        None => {
            // Small answers after their headers: without TCP_NODELAY, Nagle's algorithm holds
            // them until the client's delayed ACK (40 ms per request on a kept-alive connection).
            let tcp = axum::serve::ListenerExt::tap_io(tcp, |stream| {
                let _ = stream.set_nodelay(true);
            });
            axum::serve(tcp, app.into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(crate::mirror::shutdown_signal())
                .await?;
        }
    }
    Ok(ExitStatus::Success)
}

/// Why a refresh failed; each kind is logged once until a read succeeds again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    /// No inventory file.
    Missing,
    /// A writer holds the file.
    Busy,
    /// Another schema version than this pm's.
    Schema,
    /// Not readable as an inventory (replaced, truncated, damaged).
    Damaged,
}

/// A failed refresh.
#[derive(Debug)]
struct ReadFailure {
    kind: FailureKind,
    message: String,
}

impl From<InventoryError> for ReadFailure {
    fn from(err: InventoryError) -> ReadFailure {
        let kind = match &err {
            InventoryError::Locked { .. } => FailureKind::Busy,
            InventoryError::TooOld { .. } | InventoryError::TooNew { .. } => FailureKind::Schema,
            InventoryError::Db { .. } => FailureKind::Damaged,
        };
        ReadFailure {
            kind,
            message: err.to_string(),
        }
    }
}

/// A snapshot ready to serve: the inventory's series rendered in both formats.
#[derive(Debug)]
struct Rendered {
    /// When it was read (Unix seconds).
    read_at: f64,
    /// How long the read held the file.
    read_seconds: f64,
    /// The gauge families, the bulk of the text, the same in both formats.
    gauges: Bytes,
    infos_prometheus: Bytes,
    infos_openmetrics: Bytes,
    /// The same three compressed once per snapshot, as parts of the one gzip member a scrape
    /// that accepts gzip gets (zlib-based clients such as `curl --compressed` read only the
    /// first member of a stream, so the body must not be several).
    gauges_deflated: DeflatedPart,
    infos_prometheus_deflated: DeflatedPart,
    infos_openmetrics_deflated: DeflatedPart,
}

impl Rendered {
    /// The inventory's part of a body (cheap clones of shared bytes).
    fn chunks(&self, format: Format) -> [Bytes; 2] {
        let infos = match format {
            Format::Prometheus => &self.infos_prometheus,
            Format::OpenMetrics => &self.infos_openmetrics,
        };
        [self.gauges.clone(), infos.clone()]
    }

    /// The same, compressed.
    fn deflated(&self, format: Format) -> [&DeflatedPart; 2] {
        let infos = match format {
            Format::Prometheus => &self.infos_prometheus_deflated,
            Format::OpenMetrics => &self.infos_openmetrics_deflated,
        };
        [&self.gauges_deflated, infos]
    }
}

/// Text compressed on its own as raw deflate blocks that end in a sync flush (byte-aligned,
/// not final), so that parts compressed at different times follow each other inside one
/// gzip member; with the CRC-32 and length of the text, which the member's trailer needs.
#[derive(Debug, Clone)]
struct DeflatedPart {
    deflate: Bytes,
    crc: crc32fast::Hasher,
}

impl DeflatedPart {
    /// `text` compressed (fast level: this runs per snapshot, and metrics text compresses
    /// about 10 to 1 even so).
    fn new(text: &[u8]) -> DeflatedPart {
        use std::io::Write;
        let mut encoder = flate2::write::DeflateEncoder::new(
            Vec::with_capacity(text.len() / 8),
            flate2::Compression::fast(),
        );
        // Writing to a Vec cannot fail; `flush` is deflate's sync flush.
        let _ = encoder.write_all(text).and_then(|()| encoder.flush());
        let deflate = Bytes::from(std::mem::take(encoder.get_mut()));
        let mut crc = crc32fast::Hasher::new();
        crc.update(text);
        DeflatedPart { deflate, crc }
    }
}

/// One gzip member (RFC 1952) of `parts` and then `last`: the header, the parts' deflate
/// blocks as they are, `last` compressed now into the final block, and the trailer with the
/// CRC-32 and length of all the text, combined without reading the parts' text again.
fn gzip_member(parts: &[&DeflatedPart], last: &[u8]) -> Vec<Bytes> {
    /// Magic, deflate, no flags, no modification time, no extra flags, unknown OS.
    const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let mut crc = crc32fast::Hasher::new();
    let mut body = vec![Bytes::from_static(&HEADER)];
    for part in parts {
        crc.combine(&part.crc);
        body.push(part.deflate.clone());
    }
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing to a Vec cannot fail.
    let _ = std::io::Write::write_all(&mut encoder, last);
    body.push(Bytes::from(encoder.finish().unwrap_or_default()));
    crc.update(last);
    // ISIZE is the length modulo 2^32 (RFC 1952 section 2.3.1).
    let length = crc.total_len() as u32;
    let mut trailer = crc.finalize().to_le_bytes().to_vec();
    trailer.extend_from_slice(&length.to_le_bytes());
    body.push(Bytes::from(trailer));
    body
}

/// Whether an `Accept-Encoding` header accepts gzip (and not with `q=0`).
fn accepts_gzip(accept_encoding: Option<&str>) -> bool {
    accept_encoding.is_some_and(|value| {
        value.split(',').any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
    })
}

/// Bookkeeping of the refresh task.
#[derive(Debug, Default)]
struct RefreshState {
    last_attempt: Option<Instant>,
    running: bool,
    warned: Vec<FailureKind>,
    /// Since when every refresh found a writer holding the file.
    busy_since: Option<Instant>,
    last_error: Option<String>,
}

/// How long a writer may hold the inventory before the exporter warns: pm-poll's transaction
/// for 10,000 hosts takes about a second, so a busy refresh now and then is the normal case
/// (counted in `pm_inventory_read_errors_total`, not worth a warning each poll).
const BUSY_WARN_AFTER: Duration = Duration::from_secs(60);

/// The exporter's shared state: the snapshot served and how refreshing it goes.
#[derive(Debug)]
pub struct Exporter {
    home: PathBuf,
    refresh: Duration,
    current: RwLock<Option<Arc<Rendered>>>,
    state: Mutex<RefreshState>,
    read_errors: AtomicU64,
    /// Nanoseconds the previous scrape took to render, plus one (0: no scrape yet).
    last_scrape_nanos: AtomicU64,
    wake: Notify,
    attempts: watch::Sender<u64>,
}

impl Exporter {
    /// An exporter of the inventory in `home` that reads it at most once per `refresh`.
    pub fn new(home: PathBuf, refresh: Duration) -> Arc<Exporter> {
        Arc::new(Exporter {
            home,
            refresh,
            current: RwLock::new(None),
            state: Mutex::new(RefreshState::default()),
            read_errors: AtomicU64::new(0),
            last_scrape_nanos: AtomicU64::new(0),
            wake: Notify::new(),
            attempts: watch::Sender::new(0),
        })
    }

    fn current(&self) -> Option<Arc<Rendered>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RefreshState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the next refresh may start now: none is running and none started within
    /// `--refresh`.
    fn refresh_due(&self) -> bool {
        let state = self.state();
        !state.running
            && state
                .last_attempt
                .is_none_or(|at| at.elapsed() >= self.refresh)
    }

    /// Refreshes at once, then once per `--refresh`, earlier when a scrape finds the snapshot
    /// stale and a refresh is due.
    pub async fn refresh_loop(self: Arc<Self>) {
        loop {
            // Counted from the start of the attempt, so the snapshot served is at most
            // `--refresh` plus one read old while reads succeed.
            let next = tokio::time::Instant::now() + self.refresh;
            self.refresh_once().await;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => break,
                    _ = self.wake.notified() => if self.refresh_due() { break },
                }
            }
        }
    }

    /// One attempt: read and render off the async threads, then swap or count the failure.
    pub async fn refresh_once(&self) {
        {
            let mut state = self.state();
            if state.running {
                return;
            }
            state.running = true;
            state.last_attempt = Some(Instant::now());
        }
        let home = self.home.clone();
        let outcome = tokio::task::spawn_blocking(move || read_and_render(&home))
            .await
            .unwrap_or_else(|err| {
                Err(ReadFailure {
                    kind: FailureKind::Damaged,
                    message: format!("the snapshot read panicked: {err}"),
                })
            });
        let mut state = self.state();
        state.running = false;
        match outcome {
            Ok(rendered) => {
                tracing::debug!(read_seconds = rendered.read_seconds, "snapshot refreshed");
                *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                    Some(Arc::new(rendered));
                if !state.warned.is_empty() {
                    tracing::info!(home = %self.home.display(), "inventory readable again");
                }
                state.warned.clear();
                state.busy_since = None;
                state.last_error = None;
            }
            Err(failure) => {
                self.read_errors.fetch_add(1, Ordering::Relaxed);
                let busy_for = match failure.kind {
                    FailureKind::Busy => {
                        state.busy_since.get_or_insert_with(Instant::now).elapsed()
                    }
                    _ => {
                        state.busy_since = None;
                        Duration::MAX
                    }
                };
                if busy_for >= BUSY_WARN_AFTER && !state.warned.contains(&failure.kind) {
                    state.warned.push(failure.kind);
                    tracing::warn!(
                        kind = ?failure.kind,
                        error = %failure.message,
                        "cannot refresh the snapshot; serving the last one"
                    );
                } else {
                    tracing::debug!(kind = ?failure.kind, error = %failure.message, "refresh failed");
                }
                state.last_error = Some(failure.message);
            }
        }
        drop(state);
        self.attempts.send_modify(|n| *n += 1);
    }

    /// Before a scrape: a snapshot older than `--refresh` starts a refresh if one is due (the
    /// scrape serves the one it has: rendering a large fleet takes longer than a scrape may);
    /// without any snapshot yet, the scrape waits for a running or due refresh, but at most
    /// [`SCRAPE_WAIT`].
    async fn freshen_for_scrape(&self) {
        let current = self.current();
        let stale = current
            .as_ref()
            .is_none_or(|r| unix_now() - r.read_at > self.refresh.as_secs_f64());
        if !stale {
            return;
        }
        let running = self.state().running;
        if !running && !self.refresh_due() {
            return;
        }
        let mut attempts = self.attempts.subscribe();
        attempts.mark_unchanged();
        self.wake.notify_one();
        if current.is_none() {
            let _ = tokio::time::timeout(SCRAPE_WAIT, attempts.changed()).await;
        }
    }

    fn exporter_values(&self, current: Option<&Rendered>) -> ExporterValues {
        let scrape = self.last_scrape_nanos.load(Ordering::Relaxed);
        ExporterValues {
            snapshot_timestamp: current.map(|r| r.read_at),
            snapshot_age: current.map(|r| (unix_now() - r.read_at).max(0.0)),
            snapshot_read_seconds: current.map(|r| r.read_seconds),
            read_errors: self.read_errors.load(Ordering::Relaxed),
            scrape_duration: (scrape > 0).then(|| (scrape - 1) as f64 / 1e9),
            // Read at each scrape: two `stat`s, never blocked by a writer.
            inventory_size_bytes: Inventory::size_on_disk(&self.home),
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The expiry of the repository's signed dist statement, as Unix seconds.
fn dist_valid_until(home: &Path) -> Option<f64> {
    let signed = crate::repo::Repo::new(home).dist_statement().ok()??;
    let statement: crate::dist_statement::DistStatement =
        serde_json::from_slice(&signed.document).ok()?;
    Some(statement.expires_at.timestamp_millis() as f64 / 1000.0)
}

/// Opens the inventory read-only, reads a snapshot, closes it, and renders it.
fn read_and_render(home: &Path) -> Result<Rendered, ReadFailure> {
    let read_at = unix_now();
    let started = Instant::now();
    let data = {
        let inventory = Inventory::open_for_snapshot(home)?.ok_or_else(|| ReadFailure {
            kind: FailureKind::Missing,
            message: format!(
                "no inventory at `{}`",
                home.join(crate::inventory::INVENTORY_FILE).display()
            ),
        })?;
        let snapshot = inventory.metrics_snapshot()?;
        let alive = |r: &crate::inventory::RolloutMetrics| {
            r.state == "running" && crate::push::rollout_process_alive(home, r.pid)
        };
        let rollouts_in_progress = snapshot.rollouts.iter().filter(|r| alive(r)).count() as i64;
        let shown: Vec<i64> = snapshot
            .rollouts
            .iter()
            .filter(|r| r.most_recent || alive(r))
            .map(|r| r.job_id)
            .collect();
        let waves = inventory.rollout_waves(&shown)?;
        SnapshotData {
            snapshot,
            waves,
            rollouts_in_progress,
            dist_valid_until: dist_valid_until(home),
        }
    };
    // The inventory was dropped (closed) at the end of the block above.
    let read_seconds = started.elapsed().as_secs_f64();
    let data = Arc::new(data);
    let render =
        |part, format| Bytes::from(render::render_snapshot(Arc::clone(&data), part, format));
    let gauges = render(Part::Gauges, Format::Prometheus);
    let infos_prometheus = render(Part::Infos, Format::Prometheus);
    let infos_openmetrics = render(Part::Infos, Format::OpenMetrics);
    Ok(Rendered {
        read_at,
        read_seconds,
        gauges_deflated: DeflatedPart::new(&gauges),
        infos_prometheus_deflated: DeflatedPart::new(&infos_prometheus),
        infos_openmetrics_deflated: DeflatedPart::new(&infos_openmetrics),
        gauges,
        infos_prometheus,
        infos_openmetrics,
    })
}

/// The exporter's routes: `/metrics`, `/healthz`, behind the `--allow` list (empty: everyone).
pub fn router(exporter: Arc<Exporter>, allow: Vec<IpNet>) -> Router {
    let allow: Arc<[IpNet]> = allow.into();
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(exporter)
        .layer(axum::middleware::from_fn_with_state(allow, only_allowed))
}

/// Answers 403 with an empty body to peers outside `--allow`.
async fn only_allowed(State(allow): State<Arc<[IpNet]>>, request: Request, next: Next) -> Response {
    if allow.is_empty() {
        return next.run(request).await;
    }
    let peer: Option<IpAddr> = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip())
        .or_else(|| {
            request
                .extensions()
                .get::<ConnectInfo<TlsConnectInfo>>()
                .map(|info| info.0.remote.ip())
        });
    match peer.map(|ip| ip.to_canonical()) {
        Some(ip) if allow.iter().any(|net| net.contains(&ip)) => next.run(request).await,
        _ => StatusCode::FORBIDDEN.into_response(),
    }
}

async fn metrics(
    State(exporter): State<Arc<Exporter>>,
    headers: axum::http::HeaderMap,
) -> Response {
    exporter.freshen_for_scrape().await;
    let started = Instant::now();
    let format = Format::negotiate(
        headers
            .get(header::ACCEPT)
            .and_then(|value| value.to_str().ok()),
    );
    let compressed = accepts_gzip(
        headers
            .get(header::ACCEPT_ENCODING)
            .and_then(|value| value.to_str().ok()),
    );
    let current = exporter.current();
    let own = render::render_exporter(exporter.exporter_values(current.as_deref()), format);
    let chunks: Vec<Bytes> = match (&current, compressed) {
        (Some(rendered), true) => gzip_member(&rendered.deflated(format), own.as_bytes()),
        (None, true) => gzip_member(&[], own.as_bytes()),
        (Some(rendered), false) => rendered
            .chunks(format)
            .into_iter()
            .chain([Bytes::from(own)])
            .collect(),
        (None, false) => vec![Bytes::from(own)],
    };
    let body = Body::from_stream(futures_util::stream::iter(
        chunks.into_iter().map(Ok::<_, Infallible>),
    ));
    let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
    exporter
        .last_scrape_nanos
        .store(nanos.saturating_add(1), Ordering::Relaxed);
    let mut response = ([(header::CONTENT_TYPE, format.content_type())], body).into_response();
    let response_headers = response.headers_mut();
    response_headers.insert(
        header::VARY,
        axum::http::HeaderValue::from_static("accept-encoding"),
    );
    if compressed {
        response_headers.insert(
            header::CONTENT_ENCODING,
            axum::http::HeaderValue::from_static("gzip"),
        );
    }
    response
}

async fn healthz(State(exporter): State<Arc<Exporter>>) -> Response {
    if exporter.current().is_none() {
        exporter.freshen_for_scrape().await;
    }
    if exporter.current().is_some() {
        return (StatusCode::OK, "ok\n").into_response();
    }
    let reason = exporter
        .state()
        .last_error
        .clone()
        .unwrap_or_else(|| "the first inventory read has not finished".into());
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("no snapshot yet: {reason}\n"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// Status of `GET path` from `peer` through the router with `allow`.
    async fn status_from(peer: &str, allow: &[&str], path: &str) -> StatusCode {
        let home = tempfile::tempdir().unwrap();
        let exporter = Exporter::new(home.path().to_owned(), Duration::from_secs(15));
        let allow = allow.iter().map(|net| net.parse().unwrap()).collect();
        let peer: SocketAddr = peer.parse().unwrap();
        // What `into_make_service_with_connect_info::<SocketAddr>` puts on each request.
        let app = router(exporter, allow).layer(axum::Extension(ConnectInfo(peer)));
        let request = Request::get(path).body(Body::empty()).unwrap();
        app.oneshot(request).await.unwrap().status()
    }

    #[tokio::test]
    async fn the_allow_list_refuses_other_peers_and_matches_mapped_ipv4() {
        let check = |peer: &'static str, allow: &'static [&'static str], expected: StatusCode| async move {
            assert_eq!(
                status_from(peer, allow, "/metrics").await,
                expected,
                "{peer} {allow:?}"
            );
        };
        check("127.0.0.1:5000", &[], StatusCode::OK).await;
        check("127.0.0.1:5000", &["10.0.0.0/8"], StatusCode::FORBIDDEN).await;
        check("10.1.2.3:5000", &["10.0.0.0/8"], StatusCode::OK).await;
        check("[::ffff:10.1.2.3]:5000", &["10.0.0.0/8"], StatusCode::OK).await;
        check(
            "[2001:db8::1]:5000",
            &["10.0.0.0/8", "2001:db8::/32"],
            StatusCode::OK,
        )
        .await;
        check(
            "[2001:db9::1]:5000",
            &["2001:db8::/32"],
            StatusCode::FORBIDDEN,
        )
        .await;
    }

    #[test]
    fn parts_deflated_apart_make_one_gzip_member_of_their_text() {
        let check = |parts: &[&str], last: &str| {
            let deflated: Vec<DeflatedPart> = parts
                .iter()
                .map(|part| DeflatedPart::new(part.as_bytes()))
                .collect();
            let body: Vec<u8> =
                gzip_member(&deflated.iter().collect::<Vec<_>>(), last.as_bytes()).concat();
            // A single-member reader (what zlib-based clients are) must read it all.
            let mut decoder = flate2::bufread::GzDecoder::new(&body[..]);
            let mut text = String::new();
            std::io::Read::read_to_string(&mut decoder, &mut text).unwrap();
            assert_eq!(text, format!("{}{last}", parts.concat()));
            assert!(decoder.into_inner().is_empty(), "one member: {parts:?}");
        };
        check(&[], "");
        check(&[], "pm_exporter_build_info{version=\"1\"} 1\n");
        check(&["", ""], "tail\n");
        let big: String = (0..50_000)
            .map(|i| format!("pm_host_up{{host=\"h{i}\"}} 1\n"))
            .collect();
        check(&[&big, "# TYPE x gauge\nx 1\n"], "tail\n");
    }

    #[test]
    fn ipv4_mapped_allow_entries_are_read_as_ipv4_and_wider_ones_refused() {
        let check = |text: &str, expected: Option<&str>| {
            let got = parse_allow(text).ok().map(|net| net.to_string());
            assert_eq!(got.as_deref(), expected, "{text}");
        };
        check("::ffff:127.0.0.1/128", Some("127.0.0.1/32"));
        check("::ffff:10.0.0.0/104", Some("10.0.0.0/8"));
        check("::ffff:0:0/96", Some("0.0.0.0/0"));
        check("::ffff:0:0/95", None);
        check("10.0.0.0/8", Some("10.0.0.0/8"));
        check("2001:db8::/32", Some("2001:db8::/32"));
        check("::/0", Some("::/0"));
        check("::1/128", Some("::1/128"));
        check("10.0.0.0", None);
    }

    #[tokio::test]
    async fn healthz_is_unavailable_without_an_inventory_and_unknown_paths_are_404() {
        assert_eq!(
            status_from("127.0.0.1:5000", &[], "/healthz").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status_from("127.0.0.1:5000", &[], "/other").await,
            StatusCode::NOT_FOUND
        );
    }
}
