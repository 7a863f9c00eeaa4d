//! `pm-lab fleet`: thousands of simulated agents in one process, for tests and for the poll
//! benchmark (`scripts/bench-poll.sh`); `pm-lab handshakes`: the benchmark's baseline, bare TLS
//! handshakes to the same agents.
//!
//! Each simulated host has its own loopback address (`127.1.0.1`, `.2`, ... all inside
//! 127.0.0.0/8, which Linux routes to `lo` without configuration), its own P-256 key and a
//! certificate from the manager CA (CN = host name, IP subjectAltName = its address), and is a
//! row of the inventory's `hosts` table like an activated agent. It serves `GET /v1/poll` over
//! mutual TLS, requiring a client certificate from the manager CA as an activated `pm-agent`
//! does, with an answer shaped like a real agent's. What each host does can be changed while
//! the fleet runs ([`Behaviour`]): answer, hang, send garbage, refuse, or stop listening.
//!
//! Costs are kept per fleet, not per host, where possible: one router and its state behind one
//! `Arc`; per host there is a name, a TLS acceptor (certificates differ) and one listening
//! socket. Answers carry `Connection: close`: a real agent keeps connections alive, but here
//! 10,000 listeners plus 10,000 kept-alive connections would pass the 20,000 open files a
//! process may have on the lab machine.
//!
//! Keys live in memory and in `PM_HOME/lab/fleet.json` (0600), so running `pm-lab fleet` again
//! with the same flags serves the hosts already in the inventory instead of enrolling anew.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::IncomingStream;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::X509;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cli::{self, ExitStatus, UserError};
use crate::inventory::{HostRecord, Inventory};
use crate::pki::ca::{self, ManagerCa};
use crate::proto::{self, PollResponse};
use crate::tls::{ClientAuth, TlsListener, TlsServerConfig};

/// The port every simulated agent listens on unless told otherwise.
pub const DEFAULT_FLEET_PORT: u16 = 7600;

/// The first simulated agent's address unless told otherwise.
pub const DEFAULT_FIRST_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 1, 0, 1);

/// The test database version simulated agents report at start.
pub const DEFAULT_VERSION: u32 = 6;

/// The key cache, relative to `PM_HOME`.
const CACHE_FILE: &str = "lab/fleet.json";

/// Files a fleet needs besides one listener per host: the runtime, the inventory, and the
/// connections of one poll at the highest `pm-poll --concurrency`.
const SPARE_FILES: u64 = 300;

/// How many simulated agents and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetSpec {
    /// Number of hosts.
    pub count: u32,
    /// Address of host 0; host i listens on this address plus i, all inside 127.0.0.0/8.
    pub first_address: Ipv4Addr,
    /// Port of every host; 0 picks a port free on the first address.
    pub port: u16,
    /// Host group recorded in the inventory and reported by the agents.
    pub group: String,
    /// Host names are this prefix followed by the index (`sim-00042`).
    pub name_prefix: String,
}

impl Default for FleetSpec {
    fn default() -> FleetSpec {
        FleetSpec {
            count: 1,
            first_address: DEFAULT_FIRST_ADDRESS,
            port: DEFAULT_FLEET_PORT,
            group: "lab".into(),
            name_prefix: "sim-".into(),
        }
    }
}

impl FleetSpec {
    /// The address of host `index`.
    pub fn address(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.first_address) + index)
    }

    /// The name of host `index`: the prefix and the index, zero-padded so names sort by index.
    pub fn host_name(&self, index: u32) -> String {
        let width = self.count.saturating_sub(1).to_string().len().max(5);
        format!("{}{index:0width$}", self.name_prefix)
    }

    /// Refuses a fleet that would leave 127.0.0.0/8 or has no hosts.
    fn check(&self) -> Result<(), UserError> {
        let loopback = |address: Ipv4Addr| address.octets()[0] == 127;
        if self.count == 0 {
            return Err(UserError::usage(
                "a fleet needs at least one host (--count)",
            ));
        }
        let last = u32::from(self.first_address).checked_add(self.count - 1);
        if !loopback(self.first_address) || !last.is_some_and(|last| loopback(last.into())) {
            return Err(UserError::usage(format!(
                "{} hosts from `{}` do not fit in 127.0.0.0/8",
                self.count, self.first_address
            ))
            .with_hint("simulated agents only listen on loopback addresses; use e.g. 127.1.0.1"));
        }
        Ok(())
    }
}

/// What a simulated host does with a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Behaviour {
    /// Answers like an activated agent.
    Ok,
    /// Completes the TLS handshake, then never answers.
    Hang,
    /// Answers 200 with a body that is not JSON.
    Garbage,
    /// Answers 404 with an error document.
    Refuse,
    /// Stops listening: connections are refused until the behaviour changes again.
    Down,
}

/// One simulated host: its name, address, key and certificate.
#[derive(Clone)]
pub struct SimHost {
    /// Host name (certificate CN, inventory `host`).
    pub name: String,
    /// Where it listens.
    pub address: SocketAddrV4,
    key: PKey<Private>,
    cert: X509,
}

impl std::fmt::Debug for SimHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHost")
            .field("name", &self.name)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// An enrolled simulated fleet, not serving yet ([`SimFleet::serve`]).
#[derive(Debug)]
pub struct SimFleet {
    spec: FleetSpec,
    hosts: Vec<SimHost>,
    ca: X509,
    enrolled_at: DateTime<Utc>,
}

/// The key cache: enough to serve the same hosts again.
#[derive(Serialize, Deserialize)]
struct Cache {
    spec: FleetSpec,
    ca_fingerprint: String,
    enrolled_at: DateTime<Utc>,
    /// Key and certificate of each host, PEM, in index order.
    hosts: Vec<(String, String)>,
}

fn generate_key() -> Result<PKey<Private>> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
}

/// The port a spec asks for, or one free on its first address for port 0.
fn resolve_port(spec: &FleetSpec) -> Result<u16> {
    if spec.port != 0 {
        return Ok(spec.port);
    }
    let probe = std::net::TcpListener::bind((spec.first_address, 0))
        .with_context(|| format!("cannot find a free port on `{}`", spec.first_address))?;
    Ok(probe.local_addr()?.port())
}

impl SimFleet {
    /// Issues a key and a manager-CA certificate to every host of `spec` and records all of them
    /// as active hosts in the inventory of `home` in one transaction. A host already recorded
    /// under the same name is replaced (its certificate is new).
    pub fn enrol(home: &Path, spec: &FleetSpec) -> Result<SimFleet> {
        spec.check()?;
        let spec = FleetSpec {
            port: resolve_port(spec)?,
            ..spec.clone()
        };
        let manager_ca = ManagerCa::load_or_create(home).context("manager CA")?;
        let enrolled_at = Utc::now();
        let issue = |index: u32| -> Result<SimHost> {
            let name = spec.host_name(index);
            let ip = spec.address(index);
            let key = generate_key()?;
            let csr = ca::make_csr(&key, &name)?;
            let cert = manager_ca.sign_agent_csr_for(&csr, &name, &[IpAddr::V4(ip)])?;
            Ok(SimHost {
                name,
                address: SocketAddrV4::new(ip, spec.port),
                key,
                cert,
            })
        };
        // Key generation and signing are the slow part: one chunk per core.
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get()) as u32;
        let chunk = spec.count.div_ceil(workers);
        let hosts: Vec<SimHost> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let range = (w * chunk).min(spec.count)..((w + 1) * chunk).min(spec.count);
                    scope.spawn(move || range.map(issue).collect::<Result<Vec<_>>>())
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("issuing threads do not panic"))
                .collect::<Result<Vec<Vec<_>>>>()
        })?
        .into_iter()
        .flatten()
        .collect();
        let records = hosts
            .iter()
            .map(|host| host_record(&spec, host, enrolled_at))
            .collect::<Result<Vec<_>>>()?;
        let inventory = Inventory::open(home, Duration::from_secs(30))?;
        inventory.transaction(|inv| inv.insert_hosts(&records))?;
        let fleet = SimFleet {
            spec,
            hosts,
            ca: manager_ca.certificate().clone(),
            enrolled_at,
        };
        fleet.save_cache(home)?;
        Ok(fleet)
    }

    /// The fleet of `spec` as enrolled before (keys from the cache, hosts still active in the
    /// inventory with the same certificates), else a new enrolment ([`SimFleet::enrol`]).
    /// The flag says whether it enrolled.
    pub fn load_or_enrol(home: &Path, spec: &FleetSpec) -> Result<(SimFleet, bool)> {
        spec.check()?;
        match SimFleet::load_cached(home, spec) {
            Ok(Some(fleet)) => Ok((fleet, false)),
            Ok(None) => Ok((SimFleet::enrol(home, spec)?, true)),
            Err(err) => {
                tracing::info!(error = %format!("{err:#}"), "enrolling the fleet anew");
                Ok((SimFleet::enrol(home, spec)?, true))
            }
        }
    }

    fn load_cached(home: &Path, spec: &FleetSpec) -> Result<Option<SimFleet>> {
        let path = home.join(CACHE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => {
                return Err(err).with_context(|| format!("cannot read `{}`", path.display()));
            }
        };
        let cache: Cache = serde_json::from_slice(&bytes)?;
        let same_spec = cache.spec.count == spec.count
            && cache.spec.first_address == spec.first_address
            && (spec.port == 0 || cache.spec.port == spec.port)
            && cache.spec.group == spec.group
            && cache.spec.name_prefix == spec.name_prefix;
        let manager_ca = ManagerCa::load_or_create(home)?;
        if !same_spec || cache.ca_fingerprint != ca::cert_fingerprint(manager_ca.certificate())? {
            return Ok(None);
        }
        let spec = cache.spec;
        let hosts = cache
            .hosts
            .iter()
            .enumerate()
            .map(|(index, (key, cert))| {
                Ok(SimHost {
                    name: spec.host_name(index as u32),
                    address: SocketAddrV4::new(spec.address(index as u32), spec.port),
                    key: PKey::private_key_from_pem(key.as_bytes())?,
                    cert: X509::from_pem(cert.as_bytes())?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // The inventory must still have every host, active, with the cached certificate.
        let Some(inventory) = Inventory::open_read_only(home, Duration::from_secs(30))? else {
            return Ok(None);
        };
        let recorded: std::collections::HashMap<String, HostRecord> = inventory
            .hosts()?
            .into_iter()
            .map(|h| (h.host.clone(), h))
            .collect();
        for host in &hosts {
            let expected = ca::cert_fingerprint(&host.cert)?;
            let current = recorded.get(&host.name).is_some_and(|record| {
                record.state == "active"
                    && record.certificate_fingerprint.as_deref() == Some(expected.as_str())
                    && record.address == host.address.to_string()
            });
            if !current {
                return Ok(None);
            }
        }
        Ok(Some(SimFleet {
            spec,
            hosts,
            ca: manager_ca.certificate().clone(),
            enrolled_at: cache.enrolled_at,
        }))
    }

    fn save_cache(&self, home: &Path) -> Result<()> {
        let cache = Cache {
            spec: self.spec.clone(),
            ca_fingerprint: ca::cert_fingerprint(&self.ca)?,
            enrolled_at: self.enrolled_at,
            hosts: self
                .hosts
                .iter()
                .map(|host| {
                    Ok((
                        String::from_utf8(host.key.private_key_to_pem_pkcs8()?)?,
                        String::from_utf8(host.cert.to_pem()?)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let path = home.join(CACHE_FILE);
        let dir = path.parent().expect("the cache file is inside a directory");
        crate::durable::create_private_dir(dir, 0o700)
            .with_context(|| format!("cannot create `{}`", dir.display()))?;
        crate::durable::write_atomic(&path, &serde_json::to_vec(&cache)?, 0o600)
            .with_context(|| format!("cannot write `{}`", path.display()))
    }

    /// The fleet's spec (with the port resolved).
    pub fn spec(&self) -> &FleetSpec {
        &self.spec
    }

    /// The hosts, in index order.
    pub fn hosts(&self) -> &[SimHost] {
        &self.hosts
    }

    /// Binds every host's listener and serves polls until the returned fleet is dropped. Call
    /// inside a tokio runtime; returns once every host listens.
    pub async fn serve(self) -> Result<RunningFleet> {
        let ca_fingerprint = ca::cert_fingerprint(&self.ca)?;
        let state = Arc::new(FleetState {
            first_address: u32::from(self.spec.first_address),
            hosts: self
                .hosts
                .iter()
                .map(|host| HostState {
                    name: host.name.clone(),
                    behaviour: watch::Sender::new(Behaviour::Ok),
                    polls: AtomicU32::new(0),
                    raw_answer: std::sync::Mutex::new(None),
                })
                .collect(),
            group: self.spec.group.clone(),
            ca_fingerprint,
            enrolled_at: self.enrolled_at,
            version: AtomicU32::new(DEFAULT_VERSION),
            scan_every: AtomicU32::new(0),
            answered: AtomicU64::new(0),
        });
        let router = router(Arc::clone(&state));
        let mut tasks = Vec::with_capacity(self.hosts.len());
        for (index, host) in self.hosts.into_iter().enumerate() {
            let config = TlsServerConfig {
                key: host.key,
                cert: host.cert,
                client_auth: ClientAuth::Required {
                    ca: self.ca.clone(),
                },
            };
            let address = SocketAddr::V4(host.address);
            let listener = TlsListener::bind(address, &config).await.map_err(|err| {
                UserError::failure(format!("{err:#}")).with_hint(
                    "stop what uses the port, choose another --port, or raise the open \
                         files limit (ulimit -n)",
                )
            })?;
            tasks.push(tokio::spawn(serve_host(
                listener,
                address,
                config,
                router.clone(),
                state.hosts[index].behaviour.subscribe(),
            )));
        }
        Ok(RunningFleet {
            spec: self.spec,
            state,
            tasks,
        })
    }
}

fn host_record(spec: &FleetSpec, host: &SimHost, at: DateTime<Utc>) -> Result<HostRecord> {
    Ok(HostRecord {
        group: spec.group.clone(),
        labels: r#"{"lab":"fleet"}"#.into(),
        certificate_serial: Some(ca::serial_hex(&host.cert)?),
        certificate_fingerprint: Some(ca::cert_fingerprint(&host.cert)?),
        agent_version: Some(env!("CARGO_PKG_VERSION").into()),
        engine: Some("clamav".into()),
        activated_at: Some(at),
        ..HostRecord::active(&host.name, &host.address.to_string())
    })
}

/// Serves one host: listens while its behaviour is not [`Behaviour::Down`], closes the
/// listener when it becomes so, and listens again when it changes back.
async fn serve_host(
    listener: TlsListener,
    address: SocketAddr,
    config: TlsServerConfig,
    router: Router,
    mut behaviour: watch::Receiver<Behaviour>,
) {
    let mut listener = Some(listener);
    loop {
        let listening = match listener.take() {
            Some(listener) => listener,
            None => {
                if behaviour.wait_for(|b| *b != Behaviour::Down).await.is_err() {
                    return;
                }
                match TlsListener::bind(address, &config).await {
                    Ok(listener) => listener,
                    Err(error) => {
                        tracing::error!(%address, error = %format!("{error:#}"), "cannot listen again");
                        return;
                    }
                }
            }
        };
        let served = axum::serve(
            listening,
            router
                .clone()
                .into_make_service_with_connect_info::<SimConnection>(),
        );
        let down = async { behaviour.wait_for(|b| *b == Behaviour::Down).await.is_ok() };
        tokio::select! {
            _ = served => return,
            went_down = down => if !went_down { return },
        }
    }
}

/// A served fleet; dropping it stops every listener.
#[derive(Debug)]
pub struct RunningFleet {
    spec: FleetSpec,
    state: Arc<FleetState>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningFleet {
    /// The fleet's spec (with the port resolved).
    pub fn spec(&self) -> &FleetSpec {
        &self.spec
    }

    /// Changes what host `index` does from the next connection on (`Down` closes its listener
    /// right away, and any other behaviour opens it again).
    pub fn set_behaviour(&self, index: usize, behaviour: Behaviour) {
        if let Some(host) = self.state.hosts.get(index) {
            host.behaviour.send_replace(behaviour);
        }
    }

    /// Makes host `index` answer polls with exactly `body` (status 200, JSON content type),
    /// or like an agent again with `None`: what a broken or hostile agent may send.
    pub fn set_raw_answer(&self, index: usize, body: Option<Vec<u8>>) {
        if let Some(host) = self.state.hosts.get(index) {
            *host
                .raw_answer
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = body;
        }
    }

    /// Makes every host report test database `version` (revision `r<version>`) from now on.
    pub fn set_version(&self, version: u32) {
        self.state.version.store(version, Ordering::Relaxed);
    }

    /// Every tenth host gets a new scan report every `polls` polls it answers (0: never; each
    /// of them has one report from the start, every fifth of them with an EICAR finding).
    pub fn set_scan_every(&self, polls: u32) {
        self.state.scan_every.store(polls, Ordering::Relaxed);
    }

    /// Polls answered (with [`Behaviour::Ok`]) since the fleet started.
    pub fn polls_answered(&self) -> u64 {
        self.state.answered.load(Ordering::Relaxed)
    }
}

impl Drop for RunningFleet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Shared by every host's server.
#[derive(Debug)]
struct FleetState {
    first_address: u32,
    hosts: Vec<HostState>,
    group: String,
    ca_fingerprint: String,
    enrolled_at: DateTime<Utc>,
    version: AtomicU32,
    scan_every: AtomicU32,
    answered: AtomicU64,
}

#[derive(Debug)]
struct HostState {
    name: String,
    behaviour: watch::Sender<Behaviour>,
    polls: AtomicU32,
    /// Bytes answered with 200 instead of a poll answer, while the behaviour is `Ok`.
    raw_answer: std::sync::Mutex<Option<Vec<u8>>>,
}

/// Which host a connection reached: the local address it was accepted on.
#[derive(Clone, Copy, Debug)]
struct SimConnection {
    local: Option<SocketAddr>,
}

impl Connected<IncomingStream<'_, TlsListener>> for SimConnection {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> SimConnection {
        SimConnection {
            local: stream.io().get_ref().local_addr().ok(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cursors {
    scans_after: Option<String>,
    /// Accepted like a real agent does; simulated hosts have no update runs to send.
    #[serde(rename = "updates_after")]
    _updates_after: Option<String>,
}

fn router(state: Arc<FleetState>) -> Router {
    Router::new()
        .route(proto::POLL_PATH, get(poll_handler))
        .with_state(state)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = proto::ErrorResponse {
        code: code.into(),
        message: message.into(),
    };
    (status, axum::Json(body)).into_response()
}

async fn poll_handler(
    State(fleet): State<Arc<FleetState>>,
    ConnectInfo(connection): ConnectInfo<SimConnection>,
    Query(cursors): Query<Cursors>,
) -> Response {
    let index = connection.local.and_then(|local| match local.ip() {
        IpAddr::V4(ip) => u32::from(ip)
            .checked_sub(fleet.first_address)
            .map(|i| i as usize)
            .filter(|i| *i < fleet.hosts.len()),
        IpAddr::V6(_) => None,
    });
    let mut response = match index {
        None => error(StatusCode::NOT_FOUND, "not_found", "no simulated host here"),
        Some(index) => {
            let behaviour = *fleet.hosts[index].behaviour.borrow();
            let raw = fleet.hosts[index]
                .raw_answer
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone();
            match behaviour {
                Behaviour::Ok if raw.is_some() => (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    raw.unwrap_or_default(),
                )
                    .into_response(),
                Behaviour::Ok => axum::Json(fleet.answer(index, &cursors)).into_response(),
                Behaviour::Hang => std::future::pending().await,
                Behaviour::Garbage => {
                    (StatusCode::OK, "<html>not a poll answer</html>").into_response()
                }
                Behaviour::Refuse => error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "this simulated agent refuses polls",
                ),
                Behaviour::Down => error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "down",
                    "this simulated agent is going down",
                ),
            }
        }
    };
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Every tenth host scans; a fifth of those find EICAR.
fn scans(index: usize) -> bool {
    index.is_multiple_of(10)
}

impl FleetState {
    /// The poll answer of host `index`, counting the poll.
    fn answer(&self, index: usize, cursors: &Cursors) -> PollResponse {
        let host = &self.hosts[index];
        let polls = host.polls.fetch_add(1, Ordering::Relaxed) + 1;
        self.answered.fetch_add(1, Ordering::Relaxed);
        let version = self.version.load(Ordering::Relaxed);
        let scan_every = self.scan_every.load(Ordering::Relaxed);
        let n_scans = if scans(index) {
            1 + polls.checked_div(scan_every).unwrap_or(0)
        } else {
            0
        };
        let scans = (0..n_scans)
            .map(|k| self.scan_report(index, k))
            .filter(|report| {
                cursors
                    .scans_after
                    .as_deref()
                    .is_none_or(|after| report.id.as_str() > after)
            })
            .take(proto::POLL_MAX_REPORTS)
            .collect();
        let next_hour = (Utc::now().timestamp() / 3600 + 1) * 3600;
        PollResponse {
            status: proto::AgentStatus {
                host_name: host.name.clone(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
                agent_sha256: None,
                upgrade_error: None,
                activated: true,
                manager_ca_fingerprint: Some(self.ca_fingerprint.clone()),
                engine: "clamav".into(),
                group: Some(self.group.clone()),
                profile: Some("default".into()),
                license_expires_at: Some(self.enrolled_at + chrono::Duration::days(365)),
                hold: None,
                reports_hold: false,
                manifest_key: None,
            },
            installed: Some(proto::InstalledState {
                revision: Some(format!("r{version}")),
                serial: Some(version),
                installed_at: self.enrolled_at,
                components: vec![proto::InstalledComponent {
                    component: "test".into(),
                    version: Some(version.to_string()),
                    build_time: Some(self.enrolled_at - chrono::Duration::days(1)),
                }],
                backups: vec![Some(format!("r{}", version.saturating_sub(1)))],
                damaged: Vec::new(),
            }),
            schedule: vec![
                proto::ScheduleEntry {
                    job: "update".into(),
                    expression: "0 * * * *".into(),
                    next_run: DateTime::from_timestamp(next_hour, 0),
                },
                proto::ScheduleEntry {
                    job: "scan".into(),
                    expression: "30 3 * * *".into(),
                    next_run: None,
                },
            ],
            scans,
            updates: Vec::new(),
            report_stream: None,
            report_last: None,
        }
    }

    /// Scan report `k` of host `index`: the first an hour before enrolment, each later one a
    /// second after the one before, so ids sort by `k`.
    fn scan_report(&self, index: usize, k: u32) -> proto::ScanReport {
        let started_at =
            self.enrolled_at - chrono::Duration::hours(1) + chrono::Duration::seconds(i64::from(k));
        let finished_at = started_at + chrono::Duration::milliseconds(850);
        let infected = index.is_multiple_of(50) && k.is_multiple_of(2);
        let findings = if infected {
            vec![proto::ScanFinding {
                path: "/srv/upload/eicar.com".into(),
                signature: "Eicar-Test-Signature".into(),
            }]
        } else {
            Vec::new()
        };
        proto::ScanReport {
            id: format!("{}-{index:08x}", started_at.format("%Y%m%dT%H%M%S%.6fZ")),
            seq: None,
            started_at,
            finished_at,
            duration_seconds: 0.85,
            engine: "clamav".into(),
            program: Some("clamscan".into()),
            paths: vec!["/srv".into()],
            files_scanned: Some(1200 + index as u64 % 100),
            findings,
            result: if infected {
                proto::ScanResult::Infected
            } else {
                proto::ScanResult::Clean
            },
            error: None,
        }
    }
}

/// The soft limit of open files of this process, from `/proc/self/limits` (no `libc` here).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.split_whitespace().nth(3)?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

/// `pm-lab fleet` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// Manager home whose CA issues the certificates and whose inventory records the hosts
    #[arg(long, env = "PM_HOME", value_name = "DIR")]
    pub home: PathBuf,
    /// How many simulated agents
    #[arg(long, value_name = "N")]
    pub count: u32,
    /// Address of the first agent; agent i listens on this address plus i (inside 127.0.0.0/8)
    #[arg(long, default_value_t = DEFAULT_FIRST_ADDRESS, value_name = "IPV4")]
    pub first_address: Ipv4Addr,
    /// Port of every agent
    #[arg(long, default_value_t = DEFAULT_FLEET_PORT)]
    pub port: u16,
    /// Host group of the agents
    #[arg(long, default_value = "lab")]
    pub group: String,
    /// Test database version the agents report as installed
    #[arg(long, default_value_t = DEFAULT_VERSION)]
    pub version: u32,
    /// Every tenth agent reports a new scan every N polls (0: only one scan, at start)
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub scan_every: u32,
}

/// Runs `pm-lab fleet`: enrols when needed, serves until SIGINT or SIGTERM.
pub async fn run(args: FleetArgs) -> Result<ExitStatus> {
    let spec = FleetSpec {
        count: args.count,
        first_address: args.first_address,
        port: args.port,
        group: args.group,
        ..FleetSpec::default()
    };
    spec.check()?;
    let needed = u64::from(args.count) + SPARE_FILES;
    if let Some(limit) = open_files_limit().filter(|limit| *limit < needed) {
        return Err(UserError::usage(format!(
            "{} agents need about {needed} open files; this process may open {limit}",
            args.count
        ))
        .with_hint("raise the limit first, e.g. `ulimit -n $(ulimit -Hn)`")
        .into());
    }
    let started = Instant::now();
    let home = args.home;
    let (fleet, enrolled) =
        tokio::task::spawn_blocking(move || SimFleet::load_or_enrol(&home, &spec)).await??;
    let spec = fleet.spec().clone();
    tracing::info!(
        enrolled,
        seconds = started.elapsed().as_secs_f64(),
        "fleet {}",
        if enrolled { "enrolled" } else { "loaded" }
    );
    let running = fleet.serve().await?;
    running.set_version(args.version);
    running.set_scan_every(args.scan_every);
    eprintln!(
        "ready: {} agents on {}..{} port {}",
        spec.count,
        spec.first_address,
        spec.address(spec.count - 1),
        spec.port
    );
    crate::mirror::shutdown_signal().await;
    eprintln!("stopping: {} polls answered", running.polls_answered());
    Ok(ExitStatus::Success)
}

/// `pm-lab handshakes` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct HandshakesArgs {
    /// Manager home: its client certificate, CA and the inventory's active hosts
    #[arg(long, env = "PM_HOME", value_name = "DIR")]
    pub home: PathBuf,
    /// Handshakes at once (pm-poll's default concurrency is 256)
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// How long one handshake may take
    #[arg(long, default_value = "10s", value_parser = cli::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// Print one JSON document on stdout
    #[arg(long)]
    pub json: bool,
}

/// What `pm-lab handshakes` measured.
#[derive(Debug, Clone, Serialize)]
pub struct HandshakeReport {
    /// Hosts connected to.
    pub hosts: usize,
    /// Handshakes completed.
    pub ok: usize,
    /// Connections or handshakes that failed or timed out.
    pub failed: usize,
    /// Handshakes at once.
    pub concurrency: usize,
    /// Wall time of all of them.
    pub seconds: f64,
    /// Completed handshakes per second.
    pub per_second: f64,
    /// The first failure, if any.
    pub first_error: Option<String>,
}

/// Runs `pm-lab handshakes`: a TCP connection and a full TLS handshake with the manager's
/// client certificate to every active host, `concurrency` at once, then a close; no HTTP. The
/// lower bound of what `pm-poll` can do against the same hosts on the same machine.
pub async fn handshakes(args: HandshakesArgs) -> Result<ExitStatus> {
    if args.concurrency == 0 {
        bail!(UserError::usage("--concurrency must be at least 1"));
    }
    let home = args.home.clone();
    let (addresses, connector) = tokio::task::spawn_blocking(move || -> Result<_> {
        let Some(inventory) = Inventory::open_read_only(&home, Duration::from_secs(30))? else {
            bail!(UserError::usage(format!(
                "no inventory in `{}`: no hosts to connect to",
                home.display()
            )));
        };
        let addresses: Vec<String> = inventory
            .hosts()?
            .into_iter()
            .filter(|h| h.state == "active")
            .map(|h| h.address)
            .collect();
        let manager_ca = ManagerCa::load_or_create(&home)?;
        let (key, cert) = manager_ca.client_identity(&home)?;
        let mut builder =
            openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client())?;
        builder.set_min_proto_version(Some(openssl::ssl::SslVersion::TLS1_2))?;
        let mut store = openssl::x509::store::X509StoreBuilder::new()?;
        store.add_cert(manager_ca.certificate().clone())?;
        builder.set_cert_store(store.build());
        builder.set_private_key(&key)?;
        builder.set_certificate(&cert)?;
        Ok((addresses, builder.build()))
    })
    .await??;
    let started = Instant::now();
    let timeout = args.timeout;
    let results: Vec<Result<(), String>> = futures_util::stream::iter(addresses.iter().cloned())
        .map(|address| {
            let connector = connector.clone();
            async move {
                tokio::spawn(async move {
                    tokio::time::timeout(timeout, handshake(&connector, &address))
                        .await
                        .unwrap_or_else(|_| Err(format!("`{address}`: timed out")))
                })
                .await
                .unwrap_or_else(|err| Err(err.to_string()))
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let report = HandshakeReport {
        hosts: results.len(),
        ok,
        failed: results.len() - ok,
        concurrency: args.concurrency,
        seconds,
        per_second: ok as f64 / seconds.max(1e-9),
        first_error: results.into_iter().find_map(Result::err),
    };
    if args.json {
        cli::print_json(&report)?;
    } else {
        cli::print_text(format!(
            "{} handshakes ({} failed) in {:.2} s: {:.0}/s at concurrency {}{}",
            report.ok,
            report.failed,
            report.seconds,
            report.per_second,
            report.concurrency,
            report
                .first_error
                .as_deref()
                .map(|e| format!("\nfirst error: {e}"))
                .unwrap_or_default()
        ))?;
    }
    Ok(if report.failed == 0 {
        ExitStatus::Success
    } else {
        ExitStatus::Partial
    })
}

/// One TCP connection and TLS handshake (the server's certificate must name the IP address),
/// then a TLS close.
async fn handshake(connector: &openssl::ssl::SslConnector, address: &str) -> Result<(), String> {
    let fail = |what: &str, err: &dyn std::fmt::Display| format!("`{address}`: {what}: {err}");
    let socket: SocketAddr = address.parse().map_err(|e| fail("bad address", &e))?;
    let tcp = tokio::net::TcpStream::connect(socket)
        .await
        .map_err(|e| fail("connect", &e))?;
    let _ = tcp.set_nodelay(true);
    let ssl = connector
        .configure()
        .and_then(|c| c.into_ssl(&socket.ip().to_string()))
        .map_err(|e| fail("TLS setup", &e))?;
    let mut stream = tokio_openssl::SslStream::new(ssl, tcp).map_err(|e| fail("TLS setup", &e))?;
    std::pin::Pin::new(&mut stream)
        .connect()
        .await
        .map_err(|e| fail("handshake", &e))?;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(first: &str, count: u32, expected_ok: bool) {
        let spec = FleetSpec {
            count,
            first_address: first.parse().unwrap(),
            ..FleetSpec::default()
        };
        assert_eq!(spec.check().is_ok(), expected_ok, "{first} + {count}");
    }

    #[test]
    fn fleets_must_stay_inside_127_0_0_0_slash_8() {
        check("127.1.0.1", 10_000, true);
        check("127.255.255.0", 255, true);
        check("127.255.255.0", 257, false);
        check("10.0.0.1", 1, false);
        check("127.0.0.1", 0, false);
    }

    #[test]
    fn host_names_sort_by_index() {
        let spec = FleetSpec {
            count: 10_000,
            ..FleetSpec::default()
        };
        assert_eq!(spec.host_name(42), "sim-00042");
        assert_eq!(spec.address(256), Ipv4Addr::new(127, 1, 1, 1));
        let big = FleetSpec {
            count: 200_000,
            ..FleetSpec::default()
        };
        assert_eq!(big.host_name(7), "sim-000007");
    }
}
